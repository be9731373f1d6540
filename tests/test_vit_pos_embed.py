"""Absolute tables, ALiBi and learned-table resampling, against plain-loop references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch.testing import assert_close

from vit import FixedPosEmbed, alibi_bias, alibi_slopes, binary_embed, integer_embed, resample_pos_embed, sincos_embed

param = pytest.mark.parametrize


def row_major(grid_shape):
    return list(itertools.product(*(range(size) for size in grid_shape)))


class TestSinCos:
    @param("grid_shape", [(7,), (3, 5), (2, 3, 4), (2, 2, 3, 2)])
    def test_matches_a_loop_reference(self, grid_shape):
        dim = 40
        base, extra = divmod(dim // 2, len(grid_shape))
        pairs = [base + (axis >= len(grid_shape) - extra) for axis in range(len(grid_shape))]  # as ndrope splits pairs by default
        expected = torch.zeros(math.prod(grid_shape), dim, dtype=torch.float64)
        for n, position in enumerate(row_major(grid_shape)):
            j = 0
            for axis, count in enumerate(pairs):
                for k in range(count):
                    angle = position[axis] * 10000.0 ** (-k / count)
                    expected[n, j], expected[n, dim // 2 + j] = math.sin(angle), math.cos(angle)
                    j += 1
        table = sincos_embed(grid_shape, dim)
        assert table.dtype == torch.float32  # as the docstring says (it was float64)
        assert_close(table.double(), expected, atol=1e-5, rtol=0)

    def test_a_larger_grid_extends_the_table(self):
        small, large = sincos_embed((4, 4), 32), sincos_embed((4, 6), 32)
        assert_close(large.view(4, 6, 32)[:, :4], small.view(4, 4, 32), atol=0, rtol=0)

    def test_odd_dim_is_rejected(self):
        with pytest.raises(ValueError, match="dim=33"):
            sincos_embed((4, 4), 33)


class TestIndexEmbeddings:
    def test_integer_is_the_signed_scaled_index(self):
        table = integer_embed((3, 4), 6, divisor=12.0)
        expected = torch.arange(12.0)[:, None] / 12.0 * torch.tensor([1.0, -1, 1, -1, 1, -1])
        assert_close(table, expected, atol=0, rtol=0)

    @param("norm, divisor", [("train", 64.0), ("grid", 144.0), ("none", 1.0)])
    def test_integer_normalisation(self, norm, divisor):
        module = FixedPosEmbed("integer", 8, (8, 8), integer_norm=norm)
        assert_close(module((12, 12)), integer_embed((12, 12), 8, divisor=divisor), atol=0, rtol=0)
        assert_close(module((12, 12))[143, 0], torch.tensor(143.0 / divisor), atol=0, rtol=0)

    @param("bits", [4, 16])
    def test_binary_spells_the_index(self, bits):
        table = binary_embed((4, 4), 20, bits=bits)
        assert set(table.unique().tolist()) == {-1.0, 1.0}
        weights = 2.0 ** torch.arange(bits)
        decoded = ((table[:, :bits] + 1) / 2) @ weights
        assert_close(decoded, torch.arange(16.0), atol=0, rtol=0)
        assert_close(table[:, bits:], table[:, : 20 - bits], atol=0, rtol=0)  # channel c + bits repeats channel c

    def test_binary_wraps_beyond_its_bits(self):
        table = binary_embed((1, 20), 4, bits=4)
        assert_close(table[16:], table[:4], atol=0, rtol=0)

    def test_fixed_errors_name_the_value(self):
        with pytest.raises(ValueError, match="kind='learned'"):
            FixedPosEmbed("learned", 8, (4, 4))
        with pytest.raises(ValueError, match="binary_bits=0"):
            FixedPosEmbed("binary", 8, (4, 4), binary_bits=0)
        with pytest.raises(ValueError, match=r"embed_dim=6 .* 2 \* 4"):
            FixedPosEmbed("sincos", 6, (2, 2, 2, 2))


class TestAlibi:
    def test_slopes_are_alibis_geometric_sequence(self):
        assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]), atol=0, rtol=0)
        assert_close(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(4)]), atol=0, rtol=0)

    @param("grid_shape", [(3, 4), (2, 2, 3)])
    def test_bias_is_minus_slope_times_euclidean_distance(self, grid_shape):
        slopes = alibi_slopes(3).double()
        bias = alibi_bias(grid_shape, slopes, num_prefix_tokens=2)
        positions = row_major(grid_shape)
        assert bias.shape == (3, 2 + len(positions), 2 + len(positions))
        assert_close(bias[:, :2], torch.zeros_like(bias[:, :2]), atol=0, rtol=0)
        assert_close(bias[:, :, :2], torch.zeros_like(bias[:, :, :2]), atol=0, rtol=0)
        for i, j in itertools.product(range(len(positions)), repeat=2):
            distance = math.dist(positions[i], positions[j])
            assert_close(bias[:, 2 + i, 2 + j], -slopes * distance, atol=1e-12, rtol=1e-12)


class TestResample:
    def test_2d_is_timms_resampling(self):
        table = torch.randn(1, 1 + 16, 8)
        expected = resample_abs_pos_embed(table, [6, 5], [4, 4], num_prefix_tokens=1)
        assert_close(resample_pos_embed(table, (6, 5), (4, 4), num_prefix_tokens=1), expected, atol=0, rtol=0)

    def test_3d_is_trilinear(self):
        table = torch.randn(1, 2 + 2 * 3 * 4, 8)
        out = resample_pos_embed(table, (3, 6, 5), (2, 3, 4), num_prefix_tokens=2)
        grid = table[:, 2:].reshape(1, 2, 3, 4, 8).permute(0, 4, 1, 2, 3)
        expected = F.interpolate(grid, size=(3, 6, 5), mode="trilinear", align_corners=False)
        assert_close(out[:, :2], table[:, :2], atol=0, rtol=0)
        assert_close(out[:, 2:], expected.permute(0, 2, 3, 4, 1).reshape(1, -1, 8), atol=1e-6, rtol=1e-6)

    def test_4d_resamples_each_axis_linearly(self):
        table = torch.randn(1, 2 * 2 * 3 * 2, 4)
        out = resample_pos_embed(table, (2, 2, 5, 2), (2, 2, 3, 2))
        grid = table.reshape(2, 2, 3, 2, 4).permute(0, 1, 3, 4, 2).reshape(-1, 1, 3)
        expected = F.interpolate(grid, size=5, mode="linear", align_corners=False)
        expected = expected.reshape(2, 2, 2, 4, 5).permute(0, 1, 4, 2, 3).reshape(1, -1, 4)
        assert_close(out, expected, atol=1e-6, rtol=1e-6)

    def test_same_grid_returns_the_table(self):
        table = torch.randn(1, 24, 4)
        assert resample_pos_embed(table, (2, 3, 4), (2, 3, 4)) is table
