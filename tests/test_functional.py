"""ndrope/functional.py: the mathematical properties that make RoPE what it is, in 1D-4D, both layouts,
axial and mixed; angle precision at large positions; the RoPE-Mixed initialisation law."""

from __future__ import annotations

import math

import pytest
import torch
from rope_reference import (
    even_split,
    llama_rope,
    meta_complex_rope,
    pair_index,
    rotate_formula,
    rotate_with_matrices,
    true_ladder,
    wrapped,
)
from torch.testing import assert_close

import ndrope

NDIMS = [1, 2, 3, 4]
LAYOUTS = ["half", "interleaved"]
KINDS = ["axial", "mixed"]
DTYPES = [torch.float32, torch.float64]
HEADS, DIM = 3, 24  # 12 pairs: divisible by 1, 2, 3 and 4 axes
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make_freqs(kind: str, n_axes: int, dim: int = DIM, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(A, P) axial or (H, A, P) mixed frequencies, theta small so that every pair turns visibly."""
    if kind == "axial":
        return ndrope.axial_frequencies(dim, n_axes, theta=100.0, dtype=dtype)
    return ndrope.mixed_frequencies(dim, n_axes, HEADS, theta=10.0, generator=torch.Generator().manual_seed(n_axes), dtype=dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, layout: str) -> torch.Tensor:
    return ndrope.apply_rotary(x, ndrope.angles(positions, freqs), layout=layout)


def random_positions(n: int, n_axes: int, dtype: torch.dtype, scale: float = 20.0, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, n_axes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)


def heads_qk(n: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, HEADS, n, DIM, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
class TestRotationProperties:
    def test_matches_explicit_rotation_matrices(self, ndim, layout, kind, dtype):
        """Equal to the block-diagonal 2x2 rotation matrices built independently."""
        freqs = make_freqs(kind, ndim, dtype=dtype)
        positions = random_positions(7, ndim, dtype)
        x, _ = heads_qk(7, dtype)
        theta = ndrope.angles(positions, freqs)
        expected = rotate_with_matrices(x, theta, layout)
        torch.testing.assert_close(ndrope.apply_rotary(x, theta, layout=layout).double(), expected, **TOL[dtype])

    def test_relativity(self, ndim, layout, kind, dtype):
        """<R(p) q, R(p') k> == <q, R(p' - p) k> for random real positions."""
        freqs = make_freqs(kind, ndim, dtype=dtype)
        p, p2 = random_positions(9, ndim, dtype, seed=2), random_positions(9, ndim, dtype, seed=3)
        q, k = heads_qk(9, dtype)
        lhs = (rotate(q, p, freqs, layout) * rotate(k, p2, freqs, layout)).sum(-1)
        rhs = (q * rotate(k, p2 - p, freqs, layout)).sum(-1)
        torch.testing.assert_close(lhs, rhs, atol=TOL[dtype]["atol"] * 50, rtol=TOL[dtype]["rtol"] * 50)

    def test_norm_preserved(self, ndim, layout, kind, dtype):
        freqs = make_freqs(kind, ndim, dtype=dtype)
        x, _ = heads_qk(11, dtype)
        out = rotate(x, random_positions(11, ndim, dtype), freqs, layout)
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), **TOL[dtype])

    def test_inverse_and_composition(self, ndim, layout, kind, dtype):
        """R(-p) R(p) = I and R(p) R(p') = R(p + p')."""
        freqs = make_freqs(kind, ndim, dtype=dtype)
        p, p2 = random_positions(5, ndim, dtype, seed=4), random_positions(5, ndim, dtype, seed=5)
        x, _ = heads_qk(5, dtype)
        torch.testing.assert_close(rotate(rotate(x, p, freqs, layout), -p, freqs, layout), x, **TOL[dtype])
        composed = rotate(rotate(x, p2, freqs, layout), p, freqs, layout)
        torch.testing.assert_close(composed, rotate(x, p + p2, freqs, layout), **TOL[dtype])

    def test_position_zero_is_identity(self, ndim, layout, kind, dtype):
        freqs = make_freqs(kind, ndim, dtype=dtype)
        x, _ = heads_qk(4, dtype)
        torch.testing.assert_close(rotate(x, torch.zeros(4, ndim, dtype=dtype), freqs, layout), x, atol=0, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", [2, 3, 4])
class TestAxialSeparability:
    def test_moving_along_one_axis_changes_only_its_channels(self, ndim, layout):
        freqs = make_freqs("axial", ndim)
        sizes = even_split(DIM // 2, ndim)
        positions = random_positions(6, ndim, torch.float64)
        x, _ = heads_qk(6, torch.float64)
        base = rotate(x, positions, freqs, layout)
        start = 0
        for axis, size in enumerate(sizes):
            moved = positions.clone()
            moved[:, axis] += 3.7
            changed = (rotate(x, moved, freqs, layout) - base).abs().amax(dim=(0, 1, 2)) > 1e-9
            first, second = pair_index(DIM, DIM // 2, layout)
            own = torch.zeros(DIM, dtype=torch.bool)
            own[first[start : start + size]] = True
            own[second[start : start + size]] = True
            assert torch.equal(changed, own), f"axis {axis}: changed channels {changed.nonzero().flatten().tolist()}"
            start += size

    def test_score_splits_into_a_sum_over_axes(self, ndim, layout):
        """s(d) = sum_a s(d_a e_a) - (A - 1) s(0) for the score s(d) = <q, R(d) k>."""
        torch.testing.assert_close(separability_gap(make_freqs("axial", ndim), ndim, layout), torch.zeros(2, HEADS, 1, dtype=torch.float64), atol=1e-10, rtol=0)

    def test_mixed_is_not_separable(self, ndim, layout):
        """The control: a dense F couples the axes, so the same identity fails."""
        assert separability_gap(make_freqs("mixed", ndim), ndim, layout).abs().max() > 1e-3


def separability_gap(freqs: torch.Tensor, ndim: int, layout: str) -> torch.Tensor:
    """s(d) - [sum_a s(d_a e_a) - (A - 1) s(0)] for the score s(d) = <q, R(d) k>: zero iff separable."""
    q, k = heads_qk(1, torch.float64)
    offset = random_positions(1, ndim, torch.float64, seed=7)

    def score(d: torch.Tensor) -> torch.Tensor:
        return (q * rotate(k, d, freqs, layout)).sum(-1)

    per_axis = sum(score(offset * torch.eye(ndim, dtype=torch.float64)[a]) for a in range(ndim))
    return score(offset) - (per_axis - (ndim - 1) * score(torch.zeros(1, ndim, dtype=torch.float64)))


class TestOneDimensionalReferences:
    @pytest.mark.parametrize("theta", [10000.0, 500000.0])
    def test_half_layout_equals_transformers_rotate_half(self, theta):
        x = torch.randn(2, 4, 33, 64, dtype=torch.float64)
        positions = torch.arange(33, dtype=torch.float64)
        freqs = ndrope.axial_frequencies(64, 1, theta=theta, dtype=torch.float64)
        out = ndrope.apply_rotary(x, ndrope.angles(positions[:, None], freqs), layout="half")
        torch.testing.assert_close(out, llama_rope(x, positions, theta), atol=1e-12, rtol=1e-12)

    def test_interleaved_layout_equals_meta_complex_form(self):
        x = torch.randn(2, 4, 17, 32, dtype=torch.float64)
        positions = torch.arange(17, dtype=torch.float64) * 3
        freqs = ndrope.axial_frequencies(32, 1, theta=10000.0, dtype=torch.float64)
        out = ndrope.apply_rotary(x, ndrope.angles(positions[:, None], freqs), layout="interleaved")
        torch.testing.assert_close(out, meta_complex_rope(x, positions, 10000.0), atol=1e-12, rtol=1e-12)

    @pytest.mark.parametrize("ndim", NDIMS)
    def test_layouts_agree_up_to_a_channel_permutation(self, ndim):
        pairs = DIM // 2
        to_interleaved = torch.stack((torch.arange(pairs), torch.arange(pairs) + pairs), dim=-1).flatten()
        freqs = make_freqs("mixed", ndim)
        theta = ndrope.angles(random_positions(8, ndim, torch.float64), freqs)
        x, _ = heads_qk(8, torch.float64)
        half = ndrope.apply_rotary(x, theta, layout="half")
        interleaved = ndrope.apply_rotary(x[..., to_interleaved], theta, layout="interleaved")
        torch.testing.assert_close(interleaved, half[..., to_interleaved], atol=1e-12, rtol=1e-12)

    def test_grid_of_one_row_reduces_to_1d_on_the_width_channels(self):
        """A (1, w) image grid with axial RoPE is 1D RoPE on the width axis's channels."""
        dim = 32
        freqs2d = ndrope.axial_frequencies(dim, 2, theta=100.0, dtype=torch.float64)
        x = torch.randn(1, 2, 9, dim, dtype=torch.float64)
        out = ndrope.apply_rotary(x, ndrope.angles(ndrope.grid((1, 9), dtype=torch.float64), freqs2d), layout="interleaved")
        # width owns pairs 8..15 in the interleaved layout: channels 16..31, with the 1D ladder of 8 pairs
        width_1d = meta_complex_rope(x[..., 16:], torch.arange(9.0), 100.0)
        torch.testing.assert_close(out[..., 16:], width_1d, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out[..., :16], x[..., :16], atol=0, rtol=0)


class TestFrequencies:
    def test_axial_ladder_is_the_1d_formula_per_axis(self):
        freqs = ndrope.axial_frequencies(16, 2, theta=100.0, dtype=torch.float64)
        ladder = 1.0 / 100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        torch.testing.assert_close(freqs[0, :4], ladder, atol=0, rtol=1e-15)
        torch.testing.assert_close(freqs[1, 4:], ladder, atol=0, rtol=1e-15)
        assert (freqs[0, 4:] == 0).all() and (freqs[1, :4] == 0).all()

    def test_axial_columns_have_exactly_one_nonzero(self):
        for n_axes in NDIMS:
            freqs = ndrope.axial_frequencies(40, n_axes)
            assert ((freqs != 0).sum(dim=0) == 1).all()

    def test_uneven_split_gives_the_extra_pairs_to_the_last_axes(self):
        assert (ndrope.axial_frequencies(64, 3) != 0).sum(dim=1).tolist() == [10, 11, 11]
        norms = ndrope.mixed_frequencies(64, 3, 2, dtype=torch.float64).norm(dim=1)  # (H, P): each direction's ladder
        assert (norms - 1).abs().lt(1e-12).nonzero()[:, 1].tolist() == [0, 10, 21, 0, 10, 21]
        freqs = ndrope.axial_frequencies(64, 3, axis_dims=(8, 12, 12))
        assert (freqs != 0).sum(dim=1).tolist() == [8, 12, 12]

    def test_mixed_init_matches_heo_et_al_in_2d(self):
        """2D: directions phi and phi + pi/2 per head, magnitudes theta ** (-4k / dim)."""
        dim, heads = 32, 4
        freqs = ndrope.mixed_frequencies(dim, 2, heads, theta=10.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        magnitude = 1.0 / 10.0 ** (torch.arange(0, dim, 4, dtype=torch.float64) / dim)
        norms = freqs.norm(dim=1)  # (H, P)
        torch.testing.assert_close(norms, torch.cat((magnitude, magnitude)).expand(heads, -1), atol=1e-12, rtol=1e-12)
        first, second = freqs[:, :, 0], freqs[:, :, dim // 4]
        torch.testing.assert_close((first * second).sum(-1), torch.zeros(heads, dtype=torch.float64), atol=1e-12, rtol=0)
        assert len({round(float(torch.atan2(f[1], f[0])), 6) for f in first}) == heads  # random direction per head

    def test_mixed_directions_are_orthonormal_in_any_dimension(self):
        for n_axes in NDIMS:
            freqs = ndrope.mixed_frequencies(48, n_axes, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            starts = [sum(even_split(24, n_axes)[:i]) for i in range(n_axes)]
            basis = freqs[:, :, starts]  # the k = 0 pair of every direction has magnitude 1
            eye = torch.eye(n_axes, dtype=torch.float64).expand(2, -1, -1)
            torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=1e-12, rtol=0)

    def test_mixed_generator_makes_it_repeatable(self):
        a = ndrope.mixed_frequencies(16, 2, 3, generator=torch.Generator().manual_seed(5))
        b = ndrope.mixed_frequencies(16, 2, 3, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    def test_ntk_scaling_equals_rescaled_theta_for_axial(self):
        """theta' = theta * s ** (m / (m - 1)) on each axis, s >= 1; smaller grids keep theta."""
        theta, sizes = 100.0, (4, 6)
        freqs = ndrope.axial_frequencies(20, 2, theta=theta, axis_dims=sizes, dtype=torch.float64)
        scaled = ndrope.ntk_scaled_frequencies(freqs, (2.0, 0.5))
        expected_h = ndrope.axial_frequencies(8, 1, theta=theta * 2.0 ** (4 / 3), dtype=torch.float64)[0]
        torch.testing.assert_close(scaled[0, :4], expected_h, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(scaled[1, 4:], freqs[1, 4:], atol=0, rtol=0)


class TestAngles:
    def test_shared_and_per_head_shapes(self):
        positions = torch.rand(5, 7, 2)
        assert ndrope.angles(positions, ndrope.axial_frequencies(16, 2)).shape == (5, 7, 8)
        assert ndrope.angles(positions, ndrope.mixed_frequencies(16, 2, 3)).shape == (5, 3, 7, 8)
        assert ndrope.angles(positions[0], ndrope.mixed_frequencies(16, 2, 3)).shape == (3, 7, 8)

    def test_dtype_float32_unless_float64_positions_or_asked(self):
        freqs = ndrope.axial_frequencies(8, 1)
        assert freqs.dtype == torch.float64  # the true ladder by default
        for f in (freqs, freqs.float()):  # the freqs' dtype does not decide
            assert ndrope.angles(torch.arange(4).view(4, 1), f).dtype == torch.float32
            assert ndrope.angles(torch.zeros(4, 1, dtype=torch.float64), f).dtype == torch.float64
            assert ndrope.angles(torch.zeros(4, 1), f, dtype=torch.float64).dtype == torch.float64
        with pytest.raises(TypeError, match="dtype=torch.int32 must be a floating-point dtype"):
            ndrope.angles(torch.zeros(4, 1), freqs, dtype=torch.int32)

    def test_large_positions_keep_float64_accuracy(self):
        """Positions up to 1e5: the float32 angles are exact modulo 2*pi to float32 rounding."""
        freqs = ndrope.axial_frequencies(64, 1, theta=10000.0)
        positions = torch.tensor([[0.0], [1.0], [12345.0], [99999.0], [100000.0]])
        theta = ndrope.angles(positions, freqs).double()
        exact = positions.double() @ freqs.double()
        torch.testing.assert_close(torch.cos(theta), torch.cos(exact), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.sin(theta), torch.sin(exact), atol=1e-6, rtol=0)


class TestPrecisionAndGradients:
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_against_float64_reference_at_large_positions(self, layout, dtype):
        freqs = ndrope.axial_frequencies(64, 2, theta=10000.0)
        positions = torch.tensor([[0.0, 0.0], [3.0, 99999.0], [100000.0, 7.0], [54321.0, 12345.0]])
        x = torch.randn(2, 4, 4, 64).to(dtype)
        out = ndrope.apply_rotary(x, ndrope.angles(positions, freqs), layout=layout)
        assert out.dtype == dtype
        expected = rotate_with_matrices(x.double(), positions.double() @ freqs.double(), layout)
        # only the output rounding remains: half an ulp of the dtype, relative to the value
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), expected, atol=eps * 4, rtol=eps)

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("kind", KINDS)
    def test_gradcheck_float64(self, layout, kind):
        freqs = make_freqs(kind, 2, dim=8).requires_grad_()
        positions = random_positions(3, 2, torch.float64, scale=3.0).requires_grad_()
        x = torch.randn(1, HEADS, 3, 10, dtype=torch.float64, requires_grad=True)  # 8 of 10 channels rotate

        def fn(x, positions, freqs):
            return ndrope.apply_rotary(x, ndrope.angles(positions, freqs), layout=layout)

        assert torch.autograd.gradcheck(fn, (x, positions, freqs))
        assert torch.autograd.gradgradcheck(fn, (x, positions, freqs))

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_partial_rotation_leaves_the_tail_untouched(self, layout):
        x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
        theta = ndrope.angles(random_positions(5, 2, torch.float64), ndrope.axial_frequencies(8, 2, dtype=torch.float64))
        out = ndrope.apply_rotary(x, theta, layout=layout)
        torch.testing.assert_close(out[..., 8:], x[..., 8:], atol=0, rtol=0)
        torch.testing.assert_close(out[..., :8], rotate_with_matrices(x[..., :8], theta, layout), atol=1e-12, rtol=1e-12)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_non_contiguous_views_from_a_fused_qkv(self, layout):
        qkv = torch.randn(2, 7, 3, HEADS, DIM, dtype=torch.float64)  # (B, N, 3, H, D) as timm reshapes it
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        theta = ndrope.angles(random_positions(7, 2, torch.float64), make_freqs("mixed", 2))
        torch.testing.assert_close(
            ndrope.apply_rotary(q, theta, layout=layout), ndrope.apply_rotary(q.contiguous(), theta, layout=layout), atol=0, rtol=0
        )

    def test_cos_sin_pair_equals_angles(self):
        x = torch.randn(2, 3, 5, 8)
        theta = ndrope.angles(ndrope.grid((5,)), ndrope.axial_frequencies(8, 1))
        torch.testing.assert_close(ndrope.apply_rotary(x, ndrope.cos_sin(theta)), ndrope.apply_rotary(x, theta), atol=0, rtol=0)


class TestAnglePrecision:
    """Angle error <= 1e-6 rad against the float64 ladder theta ** (-k/m) at positions up to 1e6."""

    POSITIONS = [0.0, 1.0, 4095.0, 12345.0, 99999.0, 100000.0, 654321.0, 999999.0, 1000000.0]

    @pytest.mark.parametrize("n_axes", [1, 2])
    @pytest.mark.parametrize("theta", [100.0, 10000.0, 500000.0])
    def test_angles(self, theta, n_axes):
        dim = 64
        freqs = ndrope.axial_frequencies(dim, n_axes, theta=theta)
        ladder = true_ladder(dim // n_axes, theta)  # every axis has the same number of pairs here
        p = torch.tensor(self.POSITIONS, dtype=torch.float64)
        positions = torch.stack([p.roll(a) for a in range(n_axes)], dim=-1)  # (N, A)
        got = ndrope.angles(positions.float(), freqs)
        assert got.dtype == torch.float32
        exact = torch.cat([positions[:, a, None] * ladder for a in range(n_axes)], dim=-1)
        assert wrapped(got.double() - exact).abs().max() <= 1e-6

    @pytest.mark.parametrize("learned_dtype", [None, torch.float32], ids=["axial", "from_frequencies"])
    def test_rotation(self, learned_dtype):
        dim, theta = 64, 10000.0
        if learned_dtype is None:
            rope = ndrope.RotaryEmbedding(dim, 1, theta=theta)
        else:  # a float64 F handed to the module stays float64
            rope = ndrope.RotaryEmbedding.from_frequencies(ndrope.axial_frequencies(dim, 1, theta=theta))
        positions = torch.tensor(self.POSITIONS)[:, None]
        cos, sin = rope.rotation(positions)
        exact = positions.double() * true_ladder(dim, theta)
        assert wrapped(torch.atan2(sin.double(), cos.double()) - exact).abs().max() <= 1e-6

    def test_reference_table(self):
        rope = ndrope.RotaryEmbedding(64, 1, theta=10000.0, reference_shape=(50000,))
        cos, sin = rope.rotation((50000,))
        assert cos is rope.reference_cos
        exact = torch.arange(50000, dtype=torch.float64)[:, None] * true_ladder(64, 10000.0)
        assert wrapped(torch.atan2(sin.double(), cos.double()) - exact).abs().max() <= 1e-6


class TestMixedFrequencies:
    def test_2d_second_direction_is_phi_plus_or_minus_half_pi(self):
        """Per head the two directions are orthogonal, and both orientations occur over many heads."""
        heads, dim = 200, 16
        freqs = ndrope.mixed_frequencies(dim, 2, heads, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        first, second = freqs[:, :, 0], freqs[:, :, dim // 4]  # the k = 0 pair of each direction, magnitude 1
        phi, psi = torch.atan2(first[:, 1], first[:, 0]), torch.atan2(second[:, 1], second[:, 0])
        turn = wrapped(psi - phi)
        assert_close(turn.abs(), torch.full((heads,), math.pi / 2, dtype=torch.float64), atol=1e-12, rtol=0)
        plus = int((turn > 0).sum())
        assert 60 < plus < 140, f"{plus} of {heads} heads turn by +pi/2"  # Haar: a fair coin per head


class TestShapesAndDevices:
    """Meta tensors and high-rank x go through the functional core."""

    @pytest.mark.parametrize("heads", [None, 3])
    def test_meta_positions_and_freqs(self, heads):
        freqs = ndrope.axial_frequencies(16, 2) if heads is None else ndrope.mixed_frequencies(16, 2, heads)
        out = ndrope.angles(torch.zeros(5, 7, 2, device="meta"), freqs.to("meta"))
        assert out.device.type == "meta"
        assert out.shape == ((5, 7, 8) if heads is None else (5, 3, 7, 8))
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2)).to("meta")
        cos, sin = rope.rotation(torch.zeros(7, 2, device="meta"), num_prefix_tokens=1)
        assert cos.device.type == "meta" and cos.shape == sin.shape == (8, 8)

    def test_rank_18_x(self):
        x = torch.randn(*(1,) * 15, 2, 3, 8)
        theta = torch.randn(3, 4)
        assert x.dim() == 18
        assert_close(ndrope.apply_rotary(x, theta), rotate_formula(x, theta.cos(), theta.sin(), "half"), atol=1e-5, rtol=1e-5)
