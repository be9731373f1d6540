"""`ndrope.RotaryEmbedding`: constructors, prefix tokens, the reference-grid table, resolution modes,
learnable mixed frequencies."""

from __future__ import annotations

import pytest
import torch
from rope_reference import rotate_with_matrices

import ndrope

KINDS = ["axial", "mixed"]


def qk(n_tokens: int, heads: int = 2, dim: int = 16, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, heads, n_tokens, dim, generator=g, dtype=dtype), torch.randn(3, heads, n_tokens, dim, generator=g, dtype=dtype)


def make_rope(kind: str, dim: int = 16, n_axes: int = 2, **kwargs) -> ndrope.RotaryEmbedding:
    if kind == "axial":
        return ndrope.RotaryEmbedding(dim, n_axes, **kwargs)
    return ndrope.RotaryEmbedding.mixed(dim, n_axes, 2, generator=torch.Generator().manual_seed(0), **kwargs)


def fresh_rotation(rope: ndrope.RotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation recomputed from the module's current frequencies, bypassing anything it stores."""
    return ndrope.cos_sin(ndrope.angles(positions, rope.freqs.detach(), dtype=torch.float32))


class TestForward:
    @pytest.mark.parametrize("kind", KINDS)
    def test_grid_shape_equals_explicit_positions(self, kind):
        rope = make_rope(kind)
        q, k = qk(12)
        by_shape = rope(q, k, (3, 4))
        by_positions = rope(q, k, ndrope.grid((3, 4)))
        for a, b in zip(by_shape, by_positions):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    @pytest.mark.parametrize("layout", ["half", "interleaved"])
    def test_matches_rotation_matrices(self, layout):
        rope = ndrope.RotaryEmbedding(16, 3, theta=50.0, layout=layout)
        q, k = qk(8)
        positions = torch.rand(8, 3, dtype=torch.float64) * 10
        out_q, _ = rope(q, k, positions)
        theta = positions @ ndrope.axial_frequencies(16, 3, theta=50.0, dtype=torch.float64)
        torch.testing.assert_close(out_q, rotate_with_matrices(q, theta, layout), atol=1e-5, rtol=1e-5)

    def test_prefix_tokens_pass_through_unrotated(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        q, k = qk(1 + 4 + 6)  # class token + 4 registers + a 2x3 grid
        out_q, out_k = rope(q, k, (2, 3))
        torch.testing.assert_close(out_q[:, :, :5], q[:, :, :5], atol=0, rtol=0)
        torch.testing.assert_close(out_k[:, :, :5], k[:, :, :5], atol=0, rtol=0)
        patches_only = rope(q[:, :, 5:], k[:, :, 5:], (2, 3))[0]
        torch.testing.assert_close(out_q[:, :, 5:], patches_only, atol=0, rtol=0)

    def test_batched_positions(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        q, k = qk(4)
        positions = torch.rand(3, 4, 2, dtype=torch.float64)  # one set per sample
        out_q, _ = rope(q, k, positions[:, None])  # (B, 1, N, A) broadcasts over heads
        for b in range(3):
            torch.testing.assert_close(out_q[b], rope(q[b : b + 1], k[b : b + 1], positions[b])[0][0], atol=1e-12, rtol=0)

    def test_bf16_in_bf16_out(self):
        rope = ndrope.RotaryEmbedding.mixed(16, 2, 2)
        q, k = qk(6, dtype=torch.bfloat16)
        out_q, out_k = rope(q, k, (2, 3))
        assert out_q.dtype == out_k.dtype == torch.bfloat16

    @pytest.mark.parametrize("learnable", [False, True])
    def test_from_frequencies_takes_any_matrix(self, learnable):
        """A dense (A, P) F, as a buffer saved in the state dict or as a parameter."""
        freqs = torch.randn(2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rope = ndrope.RotaryEmbedding.from_frequencies(freqs, learnable=learnable)
        assert rope.learnable is learnable and rope.pairs == 8 and rope.n_axes == 2
        assert isinstance(rope.freqs, torch.nn.Parameter) is learnable
        assert "freqs" in rope.state_dict()  # it may not be recomputable from a config
        q, k = qk(6)
        positions = torch.rand(6, 2, dtype=torch.float64) * 5
        out_q, _ = rope(q, k, positions)
        expected = rotate_with_matrices(q, positions @ freqs, "half")
        torch.testing.assert_close(out_q, expected, atol=1e-5, rtol=1e-5)


class TestReferenceTable:
    """Fixed frequencies keep the (cos, sin) table of the reference grid as a non-persistent buffer
    (timm's pattern); every other grid is computed on demand."""

    def test_used_at_the_reference_grid_only(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(4, 4))
        cos, sin = rope.rotation((4, 4))
        assert cos is rope.reference_cos and sin is rope.reference_sin
        expected = fresh_rotation(rope, ndrope.grid((4, 4)))
        torch.testing.assert_close((cos, sin), expected, atol=1e-7, rtol=0)
        other = rope.rotation((4, 5))
        assert other[0] is not rope.reference_cos
        torch.testing.assert_close(other, fresh_rotation(rope, ndrope.grid((4, 5))), atol=0, rtol=0)
        with_prefix = rope.rotation((4, 4), num_prefix_tokens=1)
        assert with_prefix[0].shape == (17, 8)
        torch.testing.assert_close(with_prefix[0][1:], cos, atol=0, rtol=0)

    def test_is_not_saved(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(4, 4))
        assert rope.reference_cos is not None
        assert rope.state_dict() == {}  # fixed axial frequencies and their table are recomputed
        names = {name for name, _ in rope.named_buffers()}
        assert {"reference_cos", "reference_sin", "freqs"} <= names

    def test_rebuilt_on_to_and_device_moves(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(3, 3))
        stale = rope.reference_cos
        rope.to(torch.float64)
        assert rope.reference_cos is not stale
        torch.testing.assert_close(rope.reference_cos.double(), fresh_rotation(rope, ndrope.grid((3, 3)))[0].double(), atol=1e-7, rtol=0)
        rope.half()
        assert torch.isfinite(rope.reference_cos).all() and rope.reference_cos.dtype != torch.float16
        torch.testing.assert_close(rope.reference_cos.double(), fresh_rotation(rope, ndrope.grid((3, 3)))[0].double(), atol=1e-7, rtol=0)
        rope.to("meta")
        assert rope.reference_cos.device.type == "meta" and rope.freqs.device.type == "meta"

    def test_rebuilt_on_load_state_dict(self):
        """A fixed F loaded from a checkpoint: the table follows the loaded frequencies."""
        g = torch.Generator().manual_seed(0)
        source = ndrope.RotaryEmbedding.from_frequencies(torch.rand(2, 8, generator=g, dtype=torch.float64), reference_shape=(3, 3))
        target = ndrope.RotaryEmbedding.from_frequencies(torch.rand(2, 8, generator=g, dtype=torch.float64), reference_shape=(3, 3))
        assert not torch.equal(target.rotation((3, 3))[0], source.rotation((3, 3))[0])
        nested = torch.nn.Sequential(target)  # as a submodule of a model, too
        nested.load_state_dict(torch.nn.Sequential(source).state_dict())
        torch.testing.assert_close(target.rotation((3, 3)), source.rotation((3, 3)), atol=0, rtol=0)
        torch.testing.assert_close(target.rotation((3, 3)), fresh_rotation(target, ndrope.grid((3, 3))), atol=1e-7, rtol=0)

    def test_built_under_inference_mode_still_trains(self):
        """A module created (or moved) under inference_mode must not hand autograd an inference tensor."""
        with torch.inference_mode():
            rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 3))
            inside = rope.rotation((2, 3))
        cos, sin = rope.rotation((2, 3))
        assert not cos.is_inference() and not sin.is_inference()
        q, k = (t.requires_grad_() for t in qk(6))
        out_q, out_k = rope(q, k, (2, 3))
        (out_q * out_k).sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        torch.testing.assert_close(cos, inside[0], atol=0, rtol=0)

    def test_learnable_frequencies_have_no_table_and_get_gradients(self):
        rope = make_rope("mixed", reference_shape=(2, 2))
        assert rope.learnable and rope.reference_cos is None
        cos, _ = rope.rotation((2, 2))
        assert cos.requires_grad
        cos.sum().backward()
        assert rope.freqs.grad is not None and rope.freqs.grad.abs().sum() > 0

    def test_learnable_frequencies_are_followed_after_every_step(self):
        """Every optimizer step changes them; nothing stored may go stale."""
        rope = make_rope("mixed", reference_shape=(4, 4))
        optimizer = torch.optim.SGD(rope.parameters(), lr=0.1)
        for _ in range(3):
            with torch.no_grad():
                rope.rotation((4, 4))
            rope.rotation((4, 4))[0].sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.testing.assert_close(rope.rotation((4, 4)), fresh_rotation(rope, ndrope.grid((4, 4))), atol=0, rtol=0)

    def test_in_place_edits_are_seen_off_the_reference_grid(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        before = rope.rotation((2, 2))[0]
        rope.freqs.mul_(2)
        after = rope.rotation((2, 2))[0]
        torch.testing.assert_close(after, torch.cos(ndrope.angles(ndrope.grid((2, 2)), rope.freqs)), atol=0, rtol=0)
        assert not torch.equal(before, after)


class TestResolutionModes:
    def test_extrapolate_uses_integer_indices(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        torch.testing.assert_close(rope.positions((4, 4)), ndrope.grid((4, 4)), atol=0, rtol=0)
        torch.testing.assert_close(rope.positions((4, 4), mode="ntk"), ndrope.grid((4, 4)), atol=0, rtol=0)

    def test_interpolate_rescales_to_the_reference_grid(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        expected = ndrope.grid((4, 4), reference_shape=(2, 2))
        torch.testing.assert_close(rope.positions((4, 4), mode="interpolate"), expected, atol=0, rtol=0)
        torch.testing.assert_close(rope.rotation((4, 4), mode="interpolate"), fresh_rotation(rope, expected), atol=0, rtol=0)

    @pytest.mark.parametrize("kind", KINDS)
    def test_ntk_is_identity_at_the_reference_grid_and_slows_frequencies_above_it(self, kind):
        rope = make_rope(kind, reference_shape=(4, 4))
        assert rope.frequencies((4, 4), mode="ntk") is rope.freqs
        assert rope.frequencies((8, 8)) is rope.freqs  # extrapolate: no scaling
        scaled = rope.frequencies((8, 8), mode="ntk")
        ratio = (scaled.norm(dim=-2) / rope.freqs.norm(dim=-2)).detach()
        assert (ratio <= 1 + 1e-6).all() and float(ratio.min()) == pytest.approx(0.5, rel=1e-5)
        expected = ndrope.angles(ndrope.grid((8, 8)), scaled.detach(), dtype=torch.float32).cos()
        torch.testing.assert_close(rope.rotation((8, 8), mode="ntk")[0].detach(), expected, atol=0, rtol=0)

    @pytest.mark.parametrize("kind", KINDS)
    def test_mode_is_an_argument_and_modes_agree_on_the_reference_grid(self, kind):
        rope = make_rope(kind, reference_shape=(2, 2))
        tables = {mode: rope.rotation((4, 4), mode=mode)[0] for mode in ndrope.RESOLUTION_MODES}
        assert not torch.allclose(tables["interpolate"], tables["extrapolate"])
        assert not torch.allclose(tables["ntk"], tables["extrapolate"])
        torch.testing.assert_close(rope.rotation((4, 4))[0], tables["extrapolate"], atol=0, rtol=0)  # the default
        at_reference = [rope.rotation((2, 2), mode=mode)[0] for mode in ndrope.RESOLUTION_MODES]
        for table in at_reference[1:]:
            torch.testing.assert_close(table, at_reference[0], atol=0, rtol=0)
        q, k = qk(16)
        torch.testing.assert_close(
            rope(q, k, (4, 4), mode="interpolate")[0],
            ndrope.apply_rotary(q, rope.rotation((4, 4), mode="interpolate")),
            atol=0,
            rtol=0,
        )

    def test_modes_other_than_extrapolate_need_a_reference(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        for mode in ("interpolate", "ntk"):
            with pytest.raises(ValueError, match=f"mode='{mode}' needs reference_shape"):
                rope.rotation((4, 4), mode=mode)
        with pytest.raises(ValueError, match=r"mode='bicubic' is not supported; choose one of \['extrapolate', 'interpolate', 'ntk'\]"):
            ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2)).rotation((4, 4), mode="bicubic")


class TestState:
    def test_state_dict_round_trip(self):
        mixed = ndrope.RotaryEmbedding.mixed(16, 3, 4, generator=torch.Generator().manual_seed(0))
        other = ndrope.RotaryEmbedding.mixed(16, 3, 4, generator=torch.Generator().manual_seed(1))
        other.load_state_dict(mixed.state_dict())
        torch.testing.assert_close(other.freqs, mixed.freqs, atol=0, rtol=0)
        assert "freqs" not in ndrope.RotaryEmbedding(16, 2).state_dict()  # fixed axial tables are recomputed

    def test_learnable_mixed_frequencies_train(self):
        rope = ndrope.RotaryEmbedding.mixed(16, 2, 2)
        q, k = qk(4, dtype=torch.float32)
        out_q, out_k = rope(q, k, (2, 2))
        (out_q * out_k).sum().backward()
        assert rope.freqs.grad.shape == (2, 2, 8) and rope.freqs.grad.abs().sum() > 0

    def test_fixed_mixed_is_a_buffer(self):
        rope = ndrope.RotaryEmbedding.mixed(16, 2, 3, learnable=False, reference_shape=(2, 2))
        assert not rope.learnable and list(rope.parameters()) == [] and rope.reference_cos.shape == (3, 4, 8)


class TestModuleErrors:
    def test_unknown_layout(self):
        with pytest.raises(ValueError, match=r"layout='complex' is not supported; choose one of \['half', 'interleaved'\]"):
            ndrope.RotaryEmbedding(16, 2, layout="complex")

    def test_bad_frequencies(self):
        with pytest.raises(ValueError, match=r"freqs must be a floating \(A, P\) or \(H, A, P\) tensor"):
            ndrope.RotaryEmbedding.from_frequencies(torch.zeros(1, 2, 3, 4))
        with pytest.raises(ValueError, match=r"freqs must be a floating .*torch.int64"):
            ndrope.RotaryEmbedding.from_frequencies(torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(TypeError, match="freqs must be a torch.Tensor"):
            ndrope.RotaryEmbedding.from_frequencies([[1.0, 2.0]])
        with pytest.raises(TypeError, match="learnable=1 must be a bool"):
            ndrope.RotaryEmbedding.from_frequencies(torch.zeros(2, 4), learnable=1)

    def test_wrong_token_count(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        q, k = qk(5)
        with pytest.raises(ValueError, match="q has 5 tokens but positions cover 6"):
            rope(q, k, (2, 3))
        with pytest.raises(ValueError, match="after num_prefix_tokens=2"):
            rope(q, k, (2, 2), num_prefix_tokens=2)

    def test_grid_with_wrong_number_of_axes(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        q, k = qk(8)
        with pytest.raises(ValueError, match=r"grid_shape=\(2, 2, 2\) must have n_axes=2 sizes"):
            rope(q, k, (2, 2, 2))
        with pytest.raises(ValueError, match=r"must end with n_axes=2 coordinates"):
            rope(q, k, torch.zeros(8, 3))
        with pytest.raises(ValueError, match=r"reference_shape=\(4,\) must have n_axes=2 sizes"):
            ndrope.RotaryEmbedding(16, 2, reference_shape=(4,))
