"""`ndrope.RotaryEmbedding` (ndrope/modules.py): constructors, prefix tokens, the reference-grid table,
resolution modes, learnable mixed frequencies, meta-device init, checkpoint settings, casts, inference
mode, float64 activations, and global positions under context parallelism."""

from __future__ import annotations

import pytest
import torch
from rope_reference import rotate_with_matrices, true_ladder, wrapped
from torch.testing import assert_close

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
    return ndrope.cos_sin(ndrope.angles(positions, rope.frequencies().detach(), dtype=torch.float32))


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
        # fixed axial frequencies and their table are recomputed; the state dict only records the
        # settings and frequencies to check a checkpoint against (see TestCheckpointSettings)
        assert list(rope.state_dict()) == ["_extra_state"]
        torch.testing.assert_close(rope.state_dict()["_extra_state"], ndrope.axial_frequencies(16, 2), atol=0, rtol=0)
        names = {name for name, _ in rope.named_buffers()}
        assert {"reference_cos", "reference_sin", "freqs"} <= names

    def test_rebuilt_on_to_and_device_moves(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(3, 3))
        stale = rope.reference_cos
        rope.to(torch.float64)
        assert rope.reference_cos is not stale
        torch.testing.assert_close(rope.reference_cos.double(), fresh_rotation(rope, ndrope.grid((3, 3)))[0].double(), atol=1e-7, rtol=0)
        torch.testing.assert_close(rope.rotation((3, 3), dtype=torch.float64)[0], fresh_rotation(rope, ndrope.grid((3, 3)))[0].double(), atol=1e-7, rtol=0)
        rope.half()  # a rounded table is not used: the rotation is float32 and exact
        cos, _ = rope.rotation((3, 3))
        assert cos.dtype == torch.float32 and cos is not rope.reference_cos
        torch.testing.assert_close(cos.double(), fresh_rotation(rope, ndrope.grid((3, 3)))[0].double(), atol=1e-7, rtol=0)
        rope.reset_parameters()  # rebuilds the cache at float32
        assert rope.reference_cos.dtype == torch.float32 and rope.rotation((3, 3))[0] is rope.reference_cos
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
            ndrope.apply_rotary(q, rope.rotation((4, 4), mode="interpolate", dtype=q.dtype)),
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
        assert "freqs" not in ndrope.RotaryEmbedding(16, 2).state_dict()  # fixed axial frequencies are recomputed

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


def angle_error(cos: torch.Tensor, sin: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |angle - exact| (radians, modulo 2 pi) of a (cos, sin) table against float64 angles."""
    difference = torch.atan2(sin.double(), cos.double()) - exact
    return (torch.remainder(difference + torch.pi, 2 * torch.pi) - torch.pi).abs().max().item()


def meta_then_materialised(build) -> torch.nn.Module:
    """Lightning's / FSDP2's way: build on the meta device, allocate with to_empty, then reset_parameters."""
    with torch.device("meta"):
        module = build()
    assert all(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))
    module.to_empty(device="cpu")
    module.reset_parameters()
    return module


BUILDERS = {
    "axial": lambda: ndrope.RotaryEmbedding(16, 2, theta=100.0, reference_shape=(4, 4)),
    "mixed": lambda: ndrope.RotaryEmbedding.mixed(16, 2, 3, generator=torch.Generator().manual_seed(0)),
    # given frequencies stay where they are given: the module follows them to the default device
    "given": lambda: ndrope.RotaryEmbedding.from_frequencies(
        ndrope.axial_frequencies(16, 2, theta=7.0, device="cpu"), reference_shape=(4, 4), device=torch.get_default_device()
    ),
}


class TestMetaDeviceInit:
    @pytest.mark.parametrize("kind", list(BUILDERS))
    def test_materialised_module_equals_the_eager_one(self, kind):
        eager = BUILDERS[kind]()
        for _ in range(2):  # twice: nothing is read from uninitialised memory
            module = meta_then_materialised(BUILDERS[kind])
            for grid in ((4, 4), (5, 3)):
                torch.testing.assert_close(module.rotation(grid), eager.rotation(grid), atol=0, rtol=0)
            torch.testing.assert_close(module.freqs, eager.freqs, atol=0, rtol=0)

    def test_without_reset_the_table_is_garbage(self):
        """The check above can fail: to_empty alone leaves the buffers uninitialised."""
        with torch.device("meta"):
            module = BUILDERS["axial"]()
        module.to_empty(device="cpu")
        module.freqs.fill_(123.0)  # what uninitialised memory may hold
        module.reference_cos.fill_(7.0)
        assert (module.rotation((4, 4))[0] - BUILDERS["axial"]().rotation((4, 4))[0]).abs().max() > 1

    def test_frequencies_given_on_the_meta_device_cannot_be_reset(self):
        module = ndrope.RotaryEmbedding.from_frequencies(torch.zeros(2, 4, device="meta"), learnable=True)
        module.to_empty(device="cpu")
        with pytest.raises(RuntimeError, match="meta device"):
            module.reset_parameters()

    def test_reset_restores_what_the_module_was_built_with(self):
        module = BUILDERS["mixed"]()
        built = module.freqs.detach().clone()
        with torch.no_grad():
            module.freqs.add_(1.0)  # a training step
        module.reset_parameters()
        torch.testing.assert_close(module.freqs.detach(), built, atol=0, rtol=0)


class TestCheckpointSettings:
    def test_frequencies_of_other_settings_are_refused_naming_them(self):
        """A state dict of theta=100 loaded into a theta=10000 module used to load silently."""
        trained = ndrope.RotaryEmbedding(16, 2, theta=100.0)
        other = ndrope.RotaryEmbedding(16, 2, theta=10000.0)
        with pytest.raises(ValueError, match=r"theta: checkpoint 100\.0, this module 10000\.0"):
            other.load_state_dict(trained.state_dict())
        split = ndrope.RotaryEmbedding(16, 2, theta=100.0, axis_dims=(3, 5))
        with pytest.raises(ValueError, match=r"axis_dims: checkpoint \[4, 4\], this module \[3, 5\]"):
            split.load_state_dict(trained.state_dict())
        with pytest.raises(ValueError, match="theta"):  # inside a model, and with strict=False too
            torch.nn.Sequential(other).load_state_dict(torch.nn.Sequential(trained).state_dict(), strict=False)

    def test_same_settings_load_and_round_trip_through_torch_save(self, tmp_path):
        trained = ndrope.RotaryEmbedding(16, 2, theta=100.0, reference_shape=(4, 4))
        torch.save(trained.state_dict(), tmp_path / "rope.pt")
        fresh = ndrope.RotaryEmbedding(16, 2, theta=100.0, reference_shape=(4, 4))
        fresh.load_state_dict(torch.load(tmp_path / "rope.pt", weights_only=True))
        torch.testing.assert_close(fresh.rotation((5, 5)), trained.rotation((5, 5)), atol=0, rtol=0)

    def test_a_checkpoint_cast_to_bfloat16_still_loads(self):
        """Checkpoints are often stored in bfloat16: the record is compared at its own precision."""
        trained = ndrope.RotaryEmbedding(16, 2, theta=100.0)
        halved = {key: value.to(torch.bfloat16) for key, value in trained.state_dict().items()}
        ndrope.RotaryEmbedding(16, 2, theta=100.0).load_state_dict(halved)
        with pytest.raises(ValueError, match="theta"):
            ndrope.RotaryEmbedding(16, 2, theta=110.0).load_state_dict(halved)

    def test_every_state_dict_value_is_a_tensor(self):
        """safetensors (transformers' save_pretrained) and weights_only loading take tensors only."""
        for build in BUILDERS.values():
            assert all(isinstance(value, torch.Tensor) for value in build().state_dict().values())

    def test_a_checkpoint_without_the_record_loads_unchecked(self):
        """State dicts saved before the record existed (or by another library) still load strictly."""
        module = ndrope.RotaryEmbedding(16, 2, theta=100.0)
        module.load_state_dict({})
        torch.nn.Sequential(module).load_state_dict({})


class TestCasts:
    """Angles stay exact to float32 precision under the casts users make (against float64)."""

    CASTS = {
        "bfloat16": lambda m: m.to(torch.bfloat16),
        "half": lambda m: m.half(),
        "fsdp_buffer_dtype": lambda m: [setattr(m, name, b.to(torch.bfloat16)) for name, b in list(m.named_buffers())] and m,
    }

    @pytest.mark.parametrize("cast", list(CASTS))
    def test_fixed_frequencies_on_a_64x64_grid_and_1d_positions_to_1e5(self, cast):
        image = self.CASTS[cast](ndrope.RotaryEmbedding(64, 2, theta=100.0, reference_shape=(64, 64)))
        exact = ndrope.grid((64, 64), dtype=torch.float64) @ ndrope.axial_frequencies(64, 2, theta=100.0)
        for grid in ((64, 64), (64, 64)):  # the reference grid (its table) and again
            cos, sin = image.rotation(grid)
            assert cos.dtype == torch.float32 and angle_error(cos, sin, exact) < 1e-6
        text = self.CASTS[cast](ndrope.RotaryEmbedding(128, 1, theta=500000.0))
        positions = torch.arange(0, 100_001, 7, dtype=torch.float32)[:, None]
        cos, sin = text.rotation(positions)
        assert angle_error(cos, sin, positions.double() @ ndrope.axial_frequencies(128, 1, theta=500000.0)) < 1e-6

    def test_autocast_keeps_the_angles_exact(self):
        rope = ndrope.RotaryEmbedding(128, 1, theta=500000.0)
        positions = torch.arange(0, 100_001, 7, dtype=torch.float32)[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cos, sin = rope.rotation(positions)
        assert cos.dtype == torch.float32
        assert angle_error(cos, sin, positions.double() @ ndrope.axial_frequencies(128, 1, theta=500000.0)) < 1e-6

    @pytest.mark.parametrize("cast", ["bfloat16", "half"])
    def test_learned_frequencies_follow_the_cast_with_their_gradient(self, cast):
        """Parameters and gradients cast together (the gradient used to stay float32 beside a cast
        parameter... or the reverse); the angles are exact for the parameter's values."""
        rope = ndrope.RotaryEmbedding.mixed(16, 2, 2, generator=torch.Generator().manual_seed(0))
        rope.rotation((8, 8))[0].sum().backward()
        rope = self.CASTS[cast](rope)
        assert rope.freqs.grad.dtype == rope.freqs.dtype == {"bfloat16": torch.bfloat16, "half": torch.float16}[cast]
        cos, sin = rope.rotation((64, 64))
        exact = (ndrope.grid((64, 64), dtype=torch.float64)[None] @ rope.freqs.detach().double())  # H, N, P
        assert cos.dtype == torch.float32 and angle_error(cos, sin, exact) < 1e-6


class TestTrainingAfterInference:
    """No stored tensor may depend on the grad / inference mode it was first built in."""

    @staticmethod
    def model():
        import vit

        torch.manual_seed(0)
        return vit.NDRopeVisionTransformer("rope_axial", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=3)

    def test_inference_then_training(self):
        m = self.model()
        x = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            m.eval()(x)
        m.train()(x).sum().backward()
        assert all(p.grad is not None for p in m.parameters())

    def test_moved_under_inference_mode_then_training(self):
        """.to() rebuilds the reference table: under inference_mode that is an inference tensor."""
        m = self.model()
        with torch.inference_mode():
            m.to(torch.float32)
        x = torch.randn(2, 3, 32, 32)
        m.train()(x).sum().backward()
        assert m.patch_embed.proj.weight.grad is not None
        m.eval()
        with torch.no_grad():
            no_grad = m(x)
        with torch.inference_mode():
            assert_close(m(x), no_grad, atol=1e-6, rtol=1e-6)

    @pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
    def test_lightning_validate_then_fit(self, tmp_path):
        lightning = pytest.importorskip("lightning")
        from torch.utils.data import DataLoader, TensorDataset

        net = self.model()

        class Module(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g))
        loader = DataLoader(data, batch_size=2)
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        module = Module()
        before = net.head.weight.detach().clone()
        trainer.validate(module, loader, verbose=False)  # under torch.inference_mode
        trainer.fit(module, loader)
        assert trainer.global_step == 2
        assert (net.head.weight.detach() - before).abs().max() > 0


class TestFloat64Module:
    """Float64 activations rotate at float64 precision."""

    def test_double_module_gives_float64_rotation(self):
        rope = ndrope.RotaryEmbedding(16, 2, theta=100.0, reference_shape=(4, 4)).double()
        for grid in ((4, 4), (5, 3)):
            cos, sin = rope.rotation(grid, dtype=torch.float64)  # the dtype of the activations
            assert cos.dtype == sin.dtype == torch.float64, grid
            exact = ndrope.grid(grid, dtype=torch.float64) @ ndrope.axial_frequencies(16, 2, theta=100.0)
            assert_close(cos, exact.cos(), atol=1e-15, rtol=0)
        q = torch.randn(1, 2, 15, 16, dtype=torch.float64)
        positions = ndrope.grid((5, 3), dtype=torch.float64)
        theta = positions @ ndrope.axial_frequencies(16, 2, theta=100.0)
        out, _ = rope(q, q, (5, 3))
        assert_close(out, rotate_with_matrices(q, theta, "half"), atol=1e-12, rtol=1e-12)


class TestCastsKeepExactFrequencies:
    @pytest.mark.parametrize("cast", ["bfloat16", "half"])
    def test_cast_module_keeps_exact_frequencies(self, cast):
        rope = ndrope.RotaryEmbedding(64, 1)
        rope = rope.to(torch.bfloat16) if cast == "bfloat16" else rope.half()
        assert rope.frequencies().dtype == torch.float64
        positions = torch.arange(0, 4096, 7, dtype=torch.float32)[:, None]
        cos, sin = rope.rotation(positions)
        exact = positions.double() * true_ladder(64, 10000.0)
        assert wrapped(torch.atan2(sin.double(), cos.double()) - exact).abs().max() < 1e-6
        mixed = ndrope.RotaryEmbedding.mixed(16, 2, 2)
        mixed.freqs.sum().backward()  # learned frequencies with a gradient: both follow the cast together
        mixed = mixed.to(torch.bfloat16) if cast == "bfloat16" else mixed.half()
        assert isinstance(mixed.freqs, torch.nn.Parameter) and mixed.freqs.grad.dtype == mixed.freqs.dtype


# context parallelism: each rank holds a slice of the sequence, positions stay global
RANKS = 2


def load_balanced_split(n_tokens: int, ranks: int) -> list[torch.Tensor]:
    """Token indices per rank for causal load balancing: 2 * ranks chunks, rank r takes chunks r and
    2 * ranks - 1 - r (the reordering torch's context_parallel and Megatron use)."""
    chunks = torch.arange(n_tokens).chunk(2 * ranks)
    return [torch.cat((chunks[r], chunks[2 * ranks - 1 - r])) for r in range(ranks)]


@pytest.mark.parametrize("split", ["contiguous", "load_balanced"])
@pytest.mark.parametrize("grid_shape", [(64,), (4, 8), (2, 4, 4)])
def test_context_parallel_shards_with_global_positions_equal_the_whole_sequence(split, grid_shape):
    """A sequence split over ranks (in order, or reordered for causal load balance) rotates exactly as
    the unsplit one when each rank passes the global positions of its own tokens."""
    torch.manual_seed(0)
    rope = ndrope.RotaryEmbedding(16, n_axes=len(grid_shape), theta=100.0)
    positions = ndrope.grid(grid_shape)  # (N, A): global positions of the whole sequence
    n = positions.shape[0]
    q, k = torch.randn(2, 3, n, 16), torch.randn(2, 3, n, 16)
    whole_q, whole_k = rope(q, k, positions)
    shards = list(torch.arange(n).chunk(RANKS)) if split == "contiguous" else load_balanced_split(n, RANKS)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(n))
    for index in shards:  # what each rank computes from its local tokens
        local_q, local_k = rope(q[:, :, index], k[:, :, index], positions[index])
        assert torch.equal(local_q, whole_q[:, :, index]) and torch.equal(local_k, whole_k[:, :, index])


def test_context_parallel_without_positions_would_be_wrong():
    """The check above can fail: a rank that positions its slice from 0 gets a different rotation."""
    rope = ndrope.RotaryEmbedding(16, n_axes=1)
    q = torch.randn(1, 1, 32, 16)
    whole, _ = rope(q, q, (32,))
    second_half, _ = rope(q[:, :, 16:], q[:, :, 16:], (16,))  # local positions 0..15
    assert (second_half - whole[:, :, 16:]).abs().max() > 0.1


def test_readme_context_parallel_example_is_the_rotation_of_the_whole_sequence():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "load-balanced" in b)
    namespace: dict = {}
    exec(block, namespace)
    rope, q, mine = namespace["rope"], namespace["q"], namespace["mine"]
    whole = torch.zeros(1, 8, 4096, 64)
    whole[:, :, mine] = q
    expected, _ = rope(whole, whole, (4096,))
    torch.testing.assert_close(namespace["q_rot"], expected[:, :, mine], atol=0, rtol=0)
