"""Position encodings other than RoPE, each defined for any grid, so a model runs at any resolution.

Absolute tables (N, C), added to the patch tokens before the blocks:
  * `sincos_embed`: fixed sinusoids of each coordinate (Vaswani et al., per axis as in MoCo v3 / MAE);
  * `integer_embed`: the flattened patch index, one number added to every channel (sign alternating);
  * `binary_embed`: the bits of the flattened patch index as +-1, tiled over the channels;
  * `resample_pos_embed`: a learned table (timm's ``pos_embed``) resized to another grid.
A relative bias (H, N, N) on the attention logits:
  * `alibi_bias`: ALiBi (Press et al., https://arxiv.org/abs/2108.12409) on the Euclidean distance
    between patches, with the per-head slopes ``2 ** (-8 h / H)``.

Patch positions are row-major grid indices (`ndrope.grid`), one coordinate per axis A; prefix
tokens (class, registers) get no absolute embedding and zero bias.
Shape alphabet: H heads, N tokens, C embedding channels, A axes; grids as ``grid_shape``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

import ndrope
from ndrope._checks import check_choice, choices

FixedKind = Literal["sincos", "integer", "binary"]
FIXED_KINDS: tuple[str, ...] = choices(FixedKind)
IntegerNorm = Literal["train", "grid", "none"]
INTEGER_NORMS: tuple[str, ...] = choices(IntegerNorm)
#: Bits of the patch index used by `binary_embed` by default: indices up to 65535 (a 256 x 256 grid).
BINARY_BITS = 16
#: Wavelength base of `sincos_embed` (as in Vaswani et al. and MAE).
SINCOS_THETA = 10000.0


def sincos_embed(
    grid_shape: Sequence[int],
    dim: int,
    *,
    theta: float = SINCOS_THETA,
    device: torch.device | str | None = None,
) -> Tensor:
    """Fixed sinusoidal table (N, dim) for a row-major grid, float32.

    The ``dim // 2`` frequency pairs are split between the axes as RoPE splits them
    (`ndrope.axial_frequencies`); axis ``a`` with ``m`` pairs uses the ladder ``theta ** (-k / m)``.
    Channel ``j < dim // 2`` holds ``sin`` of pair ``j``'s angle, channel ``dim // 2 + j`` its ``cos``:
    the MAE 2D table up to a fixed permutation of channels. Integer positions, so a larger grid
    extends the table rather than stretching it.
    """
    if dim % 2:
        raise ValueError(f"dim={dim} must be even for a sin/cos embedding")
    freqs = ndrope.axial_frequencies(dim, len(grid_shape), theta=theta).to(device)  # (A, dim // 2)
    positions = ndrope.grid(grid_shape, device=device)  # (N, A)
    # one non-zero per column, so the sum is exact; elementwise, so TF32 matmuls cannot round it
    angles = (positions[:, :, None] * freqs).sum(dim=1)  # (N, dim // 2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).float()  # computed in float64, stored float32


def integer_embed(
    grid_shape: Sequence[int],
    dim: int,
    *,
    divisor: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The flattened patch index ``i / divisor`` in every channel, with alternating sign: (N, dim), float32.

    Channel ``c`` holds ``(-1) ** c * i / divisor``. The sign pattern is what makes the index
    visible at all: the same number added to every channel shifts only the token's channel mean,
    which every LayerNorm of a pre-norm ViT subtracts, so a plain broadcast would be "none".
    """
    index = torch.arange(math.prod(grid_shape), dtype=torch.float32, device=device) / divisor
    sign = 1 - 2 * (torch.arange(dim, device=device) % 2).to(torch.float32)
    return index[:, None] * sign


def binary_embed(
    grid_shape: Sequence[int],
    dim: int,
    *,
    bits: int = BINARY_BITS,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bit ``c % bits`` of the flattened patch index in channel ``c``, as -1 / +1: (N, dim), float32.

    Bit 0 is the least significant, so channels ``0 .. bits - 1`` spell the index and the pattern
    repeats across the width. Indices from ``2 ** bits`` on wrap around (alias earlier patches).
    """
    index = torch.arange(math.prod(grid_shape), device=device)
    bit = torch.arange(dim, device=device) % bits
    return ((index[:, None] >> bit) & 1).to(torch.float32) * 2 - 1


def alibi_slopes(num_heads: int, *, device: torch.device | str | None = None) -> Tensor:
    """ALiBi's per-head slopes ``2 ** (-8 h / H)`` for h = 1 .. H: (H,), float32."""
    heads = torch.arange(1, num_heads + 1, dtype=torch.float32, device=device)
    return torch.exp2(-8.0 * heads / num_heads)


def alibi_bias(grid_shape: Sequence[int], slopes: Tensor, *, num_prefix_tokens: int = 0) -> Tensor:
    """Logit bias (H, k + N, k + N): ``-slope_h * |p_i - p_j|`` between patches, 0 for the k prefix tokens.

    Distances are Euclidean in grid steps, over all axes of the grid (2D images, 3D video, ...).
    """
    positions = ndrope.grid(grid_shape, device=slopes.device).to(slopes.dtype)  # (N, A)
    distance = (positions[:, None, :] - positions[None, :, :]).norm(dim=-1)  # (N, N)
    bias = -slopes[:, None, None] * distance
    return F.pad(bias, (num_prefix_tokens, 0, num_prefix_tokens, 0))


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int],
    *,
    num_prefix_tokens: int = 0,
) -> Tensor:
    """Resize a learned table (1, k + N, C) from ``old_grid`` to ``new_grid``; the k prefix rows are kept.

    2D grids use timm's `resample_abs_pos_embed` (bicubic, antialiased), so a 2D model behaves as
    timm's ``dynamic_img_size`` ViT. Other dimensionalities interpolate linearly one axis at a time
    (``align_corners=False``), which is exactly multilinear interpolation (trilinear in 3D); torch
    has no 4D mode to call instead. Returns the input unchanged when the grids are equal.
    Where the table needs a gradient, the grid is made concrete under torch.compile (one graph per grid
    when training): torch has no symbolic-shape backward for antialiased bicubic resampling; evaluation
    keeps it symbolic (one graph for every grid).
    """
    if torch.is_grad_enabled() and pos_embed.requires_grad:
        new_grid, old_grid = [operator.index(s) for s in new_grid], [operator.index(s) for s in old_grid]
    else:
        new_grid, old_grid = list(new_grid), list(old_grid)
    if len(old_grid) == 2:
        return resample_abs_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens=num_prefix_tokens)
    if new_grid == old_grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    table = patches.float().reshape(*old_grid, -1)  # (*old_grid, C)
    for axis, size in enumerate(new_grid):
        if size == table.shape[axis]:
            continue
        moved = table.movedim(axis, -1)  # (..., C, old_size)
        resized = F.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
        table = resized.reshape(*moved.shape[:-1], size).movedim(-1, axis)
    return torch.cat((prefix, table.reshape(1, -1, pos_embed.shape[-1]).to(pos_embed.dtype)), dim=1)


class FixedPosEmbed(nn.Module):
    """A parameter-free absolute embedding, recomputed for each grid: ``"sincos"``, ``"integer"`` or ``"binary"``.

    Args:
        kind: which table (`sincos_embed`, `integer_embed`, `binary_embed`).
        dim: C, embedding channels.
        reference_shape: the training grid (sets the ``"train"`` normalisation of ``"integer"``).
        integer_norm: ``"integer"`` divides the index by the number of patches of the training grid
            (``"train"``: values in [0, 1) at the training size, larger beyond), of the current grid
            (``"grid"``: always [0, 1), a stretched index) or by nothing (``"none"``: the raw index).
        binary_bits: bits of the index used by ``"binary"``.
    """

    def __init__(
        self,
        kind: FixedKind,
        dim: int,
        reference_shape: Sequence[int],
        *,
        integer_norm: IntegerNorm = "train",
        binary_bits: int = BINARY_BITS,
    ) -> None:
        super().__init__()
        check_choice("kind", kind, FixedKind)
        check_choice("integer_norm", integer_norm, IntegerNorm)
        if isinstance(binary_bits, bool) or not isinstance(binary_bits, int) or not 1 <= binary_bits <= 62:
            raise ValueError(f"binary_bits={binary_bits!r} must be an int in [1, 62]")
        if kind == "sincos" and (dim % 2 or dim // 2 < len(reference_shape)):
            raise ValueError(f"embed_dim={dim} must be even and at least 2 * {len(reference_shape)} (axes) for sincos")
        self.kind, self.dim, self.reference_shape = kind, dim, tuple(reference_shape)
        self.integer_norm, self.binary_bits = integer_norm, binary_bits

    def extra_repr(self) -> str:
        detail = {"integer": f", integer_norm={self.integer_norm!r}", "binary": f", binary_bits={self.binary_bits}"}
        return f"kind={self.kind!r}, dim={self.dim}, reference_shape={self.reference_shape}" + detail.get(self.kind, "")

    def forward(self, grid_shape: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
        """Table (N, C) for a grid, float32, on ``device``."""
        if self.kind == "sincos":
            return sincos_embed(grid_shape, self.dim, device=device)
        if self.kind == "binary":
            return binary_embed(grid_shape, self.dim, bits=self.binary_bits, device=device)
        divisor = {"train": math.prod(self.reference_shape), "grid": math.prod(grid_shape), "none": 1}
        return integer_embed(grid_shape, self.dim, divisor=float(divisor[self.integer_norm]), device=device)


class AlibiBias(nn.Module):
    """2D (or N-D) ALiBi: the per-head slopes as a buffer, and `alibi_bias` per grid.

    Positions are in patch steps at every resolution (a larger grid reaches larger distances).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def reset_parameters(self) -> None:
        """Recompute the slopes (meta-device init: after ``to_empty`` they are uninitialised memory)."""
        with torch.no_grad():
            self.slopes.copy_(alibi_slopes(self.num_heads))

    def forward(self, grid_shape: Sequence[int], *, num_prefix_tokens: int = 0) -> Tensor:
        """Bias (H, k + N, k + N) in float32, to add to the scaled attention logits."""
        return alibi_bias(grid_shape, self.slopes.float(), num_prefix_tokens=num_prefix_tokens)
