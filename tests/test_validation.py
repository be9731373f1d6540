"""Every bad input to the functional API raises a ValueError/TypeError naming the argument and value."""

from __future__ import annotations

import pytest
import torch

import ndrope


class TestFrequencyArguments:
    @pytest.mark.parametrize("dim", [7, 1, 0])
    def test_odd_or_tiny_dim(self, dim):
        with pytest.raises(ValueError, match=rf"dim={dim} must be"):
            ndrope.axial_frequencies(dim, 1)

    def test_non_int_dim(self):
        with pytest.raises(TypeError, match=r"dim=16.0 must be an int"):
            ndrope.axial_frequencies(16.0, 2)

    def test_axis_dims_must_add_up(self):
        with pytest.raises(ValueError, match=r"axis_dims=\(4, 3\) must add up to dim // 2=8 pairs, got 7"):
            ndrope.axial_frequencies(16, 2, axis_dims=(4, 3))

    def test_axis_dims_one_per_axis(self):
        with pytest.raises(ValueError, match=r"axis_dims=\(8,\) must have one entry per axis \(n_axes=2\)"):
            ndrope.axial_frequencies(16, 2, axis_dims=(8,))

    def test_too_many_axes_for_dim(self):
        with pytest.raises(ValueError, match=r"dim // 2=2 pairs cannot be shared by n_axes=3"):
            ndrope.axial_frequencies(4, 3)

    @pytest.mark.parametrize("theta", [0.0, -1.0, float("inf")])
    def test_bad_theta(self, theta):
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.axial_frequencies(8, 1, theta=theta)
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.mixed_frequencies(8, 2, 1, theta=theta)
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.RotaryEmbedding(8, 1, theta=theta)

    def test_non_number_theta(self):
        with pytest.raises(TypeError, match=r"theta='100' must be a finite number > 0"):
            ndrope.axial_frequencies(8, 1, theta="100")

    def test_bad_num_heads(self):
        with pytest.raises(ValueError, match=r"num_heads=0 must be an int >= 1"):
            ndrope.mixed_frequencies(8, 2, 0)

    def test_bad_n_axes(self):
        with pytest.raises(ValueError, match=r"n_axes=0 must be an int >= 1"):
            ndrope.axial_frequencies(8, 0)


class TestAnglesArguments:
    def test_positions_last_dim_must_match_axes(self):
        with pytest.raises(ValueError, match=r"positions has 3 coordinates per token .* freqs has n_axes=2"):
            ndrope.angles(torch.zeros(4, 3), ndrope.axial_frequencies(8, 2))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_positions(self, bad):
        positions = torch.zeros(4, 2)
        positions[1, 0] = bad
        with pytest.raises(ValueError, match="positions contains non-finite values"):
            ndrope.angles(positions, ndrope.axial_frequencies(8, 2))

    def test_wrong_ranks(self):
        with pytest.raises(ValueError, match=r"positions must have rank >= 2, got shape \(4,\)"):
            ndrope.angles(torch.zeros(4), ndrope.axial_frequencies(8, 1))
        with pytest.raises(ValueError, match=r"freqs must be \(A, P\) or \(H, A, P\), got shape \(1, 2, 2, 4\)"):
            ndrope.angles(torch.zeros(4, 2), torch.zeros(1, 2, 2, 4))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="positions must be a torch.Tensor, got list"):
            ndrope.angles([[0.0, 1.0]], ndrope.axial_frequencies(8, 2))

    def test_complex_positions(self):
        with pytest.raises(TypeError, match="positions must be a real"):
            ndrope.angles(torch.zeros(4, 1, dtype=torch.complex64), ndrope.axial_frequencies(8, 1))


class TestApplyRotaryArguments:
    def test_unknown_layout(self):
        with pytest.raises(ValueError, match=r"layout='neox' is not supported; choose one of \['half', 'interleaved'\]"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4), layout="neox")

    def test_too_many_pairs_for_the_head(self):
        with pytest.raises(ValueError, match=r"the rotation turns 8 pairs = 16 channels but x has only D=8 channels"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 8))

    def test_token_count_mismatch(self):
        with pytest.raises(ValueError, match=r"the rotation is for 5 tokens but x has N=4 tokens"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(5, 4))

    def test_mismatched_heads(self):
        with pytest.raises(ValueError, match=r"the rotation's leading dims \(3,\) do not broadcast against x's leading dims \(2, 4\)"):
            ndrope.apply_rotary(torch.zeros(2, 4, 5, 8), torch.zeros(3, 5, 4))

    def test_integer_x(self):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8, dtype=torch.long), torch.zeros(4, 4))

    def test_bad_cos_sin_pair(self):
        with pytest.raises(ValueError, match=r"cos \(4, 4\) and sin \(4, 3\) must have the same shape"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), (torch.zeros(4, 4), torch.zeros(4, 3)))
        with pytest.raises(TypeError, match="rotation must be a Tensor of angles or a \\(cos, sin\\) pair"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), 0.5)


class TestGridArguments:
    def test_bad_shapes(self):
        with pytest.raises(ValueError, match=r"shape=\(4, 0\) must contain only positive ints"):
            ndrope.grid((4, 0))
        with pytest.raises(TypeError, match=r"shape=\(\) must be a non-empty tuple"):
            ndrope.grid(())

    def test_reference_rank(self):
        with pytest.raises(ValueError, match=r"reference_shape=\(4,\) must have as many axes as shape=\(4, 4\)"):
            ndrope.grid((4, 4), reference_shape=(4,))


class TestSiblingsOfIssue12:
    """More bad inputs of the kinds issue 12 lists: each must be refused with its argument's name."""

    def test_mode_is_checked_for_explicit_positions_too(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        with pytest.raises(ValueError, match=r"mode='bicubic' is not supported"):
            rope.rotation(ndrope.grid((2, 2)), mode="bicubic")
        q = torch.zeros(1, 2, 4, 16)
        with pytest.raises(ValueError, match=r"mode='bicubic' is not supported"):
            rope(q, q, ndrope.grid((2, 2)), mode="bicubic")

    def test_rank_one_positions_in_forward(self):
        q = torch.zeros(1, 2, 5, 16)
        with pytest.raises(ValueError, match=r"positions must have rank >= 2, got shape \(5,\)"):
            ndrope.RotaryEmbedding(16, 2)(q, q, torch.zeros(5))

    @pytest.mark.parametrize("offset", ["a", True, (1.0, "b")])
    def test_grid_offset_that_is_not_a_number(self, offset):
        with pytest.raises((TypeError, ValueError), match="offset="):
            ndrope.grid((2, 2), offset=offset)

    def test_integer_angles_name_the_rotation(self):
        with pytest.raises(TypeError, match=r"(rotation|angles) must be a floating-point tensor, got dtype torch.int64"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4, dtype=torch.long))

    def test_rotation_on_another_device(self):
        with pytest.raises(ValueError, match="the rotation is on meta but x is on cpu"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4, device="meta"))
