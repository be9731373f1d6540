"""`ndrope.RotaryEmbedding`: prefix tokens, caching, resolution modes, learnable mixed frequencies."""

from __future__ import annotations

import pytest
import torch

import ndrope
from rope_reference import rotate_with_matrices


def qk(n_tokens: int, heads: int = 2, dim: int = 16, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, heads, n_tokens, dim, generator=g, dtype=dtype), torch.randn(3, heads, n_tokens, dim, generator=g, dtype=dtype)


class TestForward:
    @pytest.mark.parametrize("kind", ["axial", "mixed"])
    def test_grid_shape_equals_explicit_positions(self, kind):
        rope = ndrope.RotaryEmbedding(16, 2, kind=kind, num_heads=2)
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
        rope = ndrope.RotaryEmbedding(16, 2, kind="mixed", num_heads=2)
        q, k = qk(6, dtype=torch.bfloat16)
        out_q, out_k = rope(q, k, (2, 3))
        assert out_q.dtype == out_k.dtype == torch.bfloat16


class TestCaching:
    def test_fixed_frequencies_are_cached_per_grid_shape(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        first = rope.cos_sin((4, 4))
        assert rope.cos_sin((4, 4))[0] is first[0]
        assert rope.cos_sin((4, 5))[0] is not first[0]
        assert rope.cos_sin((4, 4), num_prefix_tokens=1)[0].shape == (17, 8)

    def test_learnable_frequencies_are_not_cached_while_training(self):
        rope = ndrope.RotaryEmbedding(16, 2, kind="mixed", num_heads=2)
        cos, _ = rope.cos_sin((2, 2))
        assert cos.requires_grad
        cos.sum().backward()
        assert rope.freqs.grad is not None and rope.freqs.grad.abs().sum() > 0

    def test_cache_follows_changed_frequencies(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        before = rope.cos_sin((2, 2))[0]
        rope.freqs.mul_(2)
        after = rope.cos_sin((2, 2))[0]
        torch.testing.assert_close(after, torch.cos(ndrope.angles(ndrope.grid((2, 2)), rope.freqs)), atol=0, rtol=0)
        assert not torch.equal(before, after)

    def test_cache_follows_the_module_dtype(self):
        rope = ndrope.RotaryEmbedding(16, 2)
        assert rope.cos_sin((2, 2))[0].dtype == torch.float32
        rope.double()
        assert rope.cos_sin((2, 2))[0].dtype == torch.float64

    def test_cache_is_bounded(self):
        rope = ndrope.RotaryEmbedding(16, 1)
        for n in range(1, 3 * rope.CACHE_SIZE):
            rope.cos_sin((n,))
        assert len(rope._cache) == rope.CACHE_SIZE
        recent = rope.cos_sin((3 * rope.CACHE_SIZE - 1,))[0]
        assert rope.cos_sin((3 * rope.CACHE_SIZE - 1,))[0] is recent

    def test_learnable_frequencies_are_never_cached(self):
        """Every optimizer step changes them; caching would grow without bound and go stale."""
        rope = ndrope.RotaryEmbedding(16, 2, kind="mixed", num_heads=4)
        optimizer = torch.optim.SGD(rope.parameters(), lr=0.1)
        for _ in range(3):
            with torch.no_grad():
                rope.cos_sin((4, 4))
            rope.cos_sin((4, 4))[0].sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert len(rope._cache) == 0


class TestResolutionModes:
    def test_extrapolate_uses_integer_indices(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        torch.testing.assert_close(rope.grid_positions((4, 4)), ndrope.grid((4, 4)), atol=0, rtol=0)

    def test_interpolate_rescales_to_the_reference_grid(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2), resolution_mode="interpolate")
        torch.testing.assert_close(rope.grid_positions((4, 4)), ndrope.grid((4, 4), reference_shape=(2, 2)), atol=0, rtol=0)

    @pytest.mark.parametrize("kind", ["axial", "mixed"])
    def test_ntk_is_identity_at_the_reference_grid_and_slows_frequencies_above_it(self, kind):
        rope = ndrope.RotaryEmbedding(16, 2, kind=kind, num_heads=2, reference_shape=(4, 4), resolution_mode="ntk")
        assert rope.frequencies((4, 4)) is rope.freqs
        scaled = rope.frequencies((8, 8))
        ratio = (scaled.norm(dim=-2) / rope.freqs.norm(dim=-2)).detach()
        assert (ratio <= 1 + 1e-6).all() and float(ratio.min()) == pytest.approx(0.5, rel=1e-5)

    def test_set_resolution_mode_invalidates_the_cache(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        extrapolated = rope.cos_sin((4, 4))[0]
        rope.set_resolution_mode("interpolate")
        assert not torch.equal(rope.cos_sin((4, 4))[0], extrapolated)

    def test_modes_other_than_extrapolate_need_a_reference(self):
        with pytest.raises(ValueError, match="resolution_mode='ntk' needs reference_shape"):
            ndrope.RotaryEmbedding(16, 2, resolution_mode="ntk")
        with pytest.raises(ValueError, match=r"resolution_mode='bicubic' is not supported; choose one of \['extrapolate', 'interpolate', 'ntk'\]"):
            ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2), resolution_mode="bicubic")


class TestAugmentationAndState:
    def test_augmentation_only_in_training_mode(self):
        rope = ndrope.RotaryEmbedding(16, 2, shift=1.0, jitter=1.5)
        rope.eval()
        torch.testing.assert_close(rope.angles((3, 3)), ndrope.angles(ndrope.grid((3, 3)), rope.freqs), atol=0, rtol=0)
        rope.train()
        torch.manual_seed(0)
        assert not torch.allclose(rope.angles((3, 3)), rope.angles((3, 3)))

    def test_state_dict_round_trip(self):
        mixed = ndrope.RotaryEmbedding(16, 3, kind="mixed", num_heads=4, generator=torch.Generator().manual_seed(0))
        other = ndrope.RotaryEmbedding(16, 3, kind="mixed", num_heads=4, generator=torch.Generator().manual_seed(1))
        other.load_state_dict(mixed.state_dict())
        torch.testing.assert_close(other.freqs, mixed.freqs, atol=0, rtol=0)
        assert "freqs" not in ndrope.RotaryEmbedding(16, 2).state_dict()  # fixed axial tables are recomputed

    def test_learnable_mixed_frequencies_train(self):
        rope = ndrope.RotaryEmbedding(16, 2, kind="mixed", num_heads=2)
        q, k = qk(4, dtype=torch.float32)
        out_q, out_k = rope(q, k, (2, 2))
        (out_q * out_k).sum().backward()
        assert rope.freqs.grad.shape == (2, 2, 8) and rope.freqs.grad.abs().sum() > 0


class TestModuleErrors:
    def test_mixed_needs_num_heads(self):
        with pytest.raises(ValueError, match="num_heads is required for kind='mixed'"):
            ndrope.RotaryEmbedding(16, 2, kind="mixed")

    def test_unknown_kind_and_layout(self):
        with pytest.raises(ValueError, match=r"kind='dense' is not supported; choose one of \['axial', 'mixed'\]"):
            ndrope.RotaryEmbedding(16, 2, kind="dense")
        with pytest.raises(ValueError, match=r"layout='complex' is not supported"):
            ndrope.RotaryEmbedding(16, 2, layout="complex")

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
        with pytest.raises(ValueError, match=r"positions \(grid shape\)=\(2, 2, 2\) must have n_axes=2 sizes"):
            rope(q, k, (2, 2, 2))
        with pytest.raises(ValueError, match=r"must end with n_axes=2 coordinates"):
            rope(q, k, torch.zeros(8, 3))
