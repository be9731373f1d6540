"""Vision RoPE: timm / EVA-02 axial, naver RoPE-Axial and RoPE-Mixed, DINOv3, Pixtral, rotary-embedding-torch.

Axial schemes here lay out pairs axis-major (axis 0's block, then axis 1's, ...), as timm and
rotary-embedding-torch do, and each recipe carries its peer's channel layout and coordinate law:
``recipe.positions(grid_shape)`` gives the (N, A) positions the peer uses for that grid.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_number, check_tensor
from ._base import Coordinates, Indexing, Normalize, RopeRecipe, block_axial, ladder

FreqsFor = Literal["lang", "pixel"]


def _bands_per_axis(head_dim: int, n_axes: int) -> int:
    check_int("head_dim", head_dim, minimum=2)
    check_int("n_axes", n_axes)
    if head_dim % (2 * n_axes):
        raise ValueError(f"head_dim={head_dim} must be divisible by 2 * n_axes = {2 * n_axes}")
    return head_dim // (2 * n_axes)


def pixel_bands(bands: int, max_res: float, *, linear_bands: bool = True) -> Tensor:
    """timm's pixel-mode bands (bands,): ``pi * linspace(1, max_res / 2)`` (linear) or
    ``pi * 2 ** linspace(0, log2(max_res) - 1)``."""
    if linear_bands:
        return torch.linspace(1.0, max_res / 2, bands, dtype=torch.float64) * math.pi
    return 2 ** torch.linspace(0, math.log(max_res, 2) - 1, bands, dtype=torch.float64) * math.pi


def timm_axial(
    head_dim: int,
    n_axes: int = 2,
    *,
    theta: float = 10000.0,
    ref_feat_shape: tuple[int, ...] | None = None,
    grid_offset: float = 0.0,
    indexing: Indexing = "ij",
    rotate_half: bool = False,
    in_pixels: bool = False,
    max_res: int = 224,
    linear_bands: bool = False,
) -> RopeRecipe:
    """timm's ``RotaryEmbedding`` / ``RotaryEmbeddingCat`` (EVA-02: ``in_pixels=False`` with ``ref_feat_shape``).

    Each axis gets ``head_dim // (2 * n_axes)`` bands ``theta ** (-k / bands)`` (``in_pixels=True``: timm's pixel
    bands, with ``linspace(-1, 1)`` coordinates). ``ref_feat_shape`` rescales a grid to span the pretraining grid
    (EVA-02's interpolation); ``grid_offset`` is added before that rescale. Layout "interleaved", or "half" with
    ``rotate_half=True`` (timm >= 1.0.30). (timm always uses ``dim // 4`` bands per axis; that equals ours for the
    2D it supports.)
    """
    bands = _bands_per_axis(head_dim, n_axes)
    if in_pixels:
        band = pixel_bands(bands, float(max_res), linear_bands=linear_bands)
    else:
        band = ladder(bands, check_number("theta", theta), denominator=2 * bands)
    coords = Coordinates(
        kind="pixel" if in_pixels else "index",
        reference_shape=ref_feat_shape,
        offset=0.0 if in_pixels else grid_offset,
        indexing=indexing,
    )
    return RopeRecipe(block_axial([band] * n_axes), "half" if rotate_half else "interleaved", 1.0, coords)


def pixtral(head_dim: int, *, theta: float = 10000.0) -> RopeRecipe:
    """Pixtral's vision RoPE (Mistral AI 2024, https://arxiv.org/abs/2410.07073; transformers
    ``PixtralVisionRotaryEmbedding``): one 1D ladder ``theta ** (-2k / head_dim)`` over all ``head_dim // 2`` pairs,
    its even rungs on the row axis (the first ``head_dim // 4`` pairs) and its odd rungs on the column axis (the
    rest), on integer (row, column) patch indices, layout "half". The obvious axial RoPE with a ladder per axis
    differs: each axis here spans the whole 1D range of frequencies."""
    _bands_per_axis(head_dim, 2)
    rungs = ladder(head_dim // 2, check_number("theta", theta))
    return RopeRecipe(block_axial([rungs[0::2], rungs[1::2]]), "half", 1.0, Coordinates(kind="index"))


def rope_axial(head_dim: int, *, theta: float = 100.0, indexing: Indexing = "xy") -> RopeRecipe:
    """RoPE-Axial of Heo et al. (ECCV 2024, https://arxiv.org/abs/2403.13298; naver-ai/rope-vit): x on the first
    ``head_dim // 4`` pairs, y on the next, ``theta ** (-4k / head_dim)``, interleaved (timm: ``temperature=100,
    in_pixels=False, grid_indexing="xy"``)."""
    return timm_axial(head_dim, 2, theta=theta, indexing=indexing)


def rope_mixed(freqs: Tensor, *, indexing: Indexing = "xy") -> RopeRecipe:
    """RoPE-Mixed (Heo et al. 2024) with given frequencies, as timm's ``RotaryEmbeddingMixed`` applies them.

    Args:
        freqs: the (2, H, P) frequencies of one block in timm / naver layout (``module.freqs[:, block]``):
            ``freqs[0]`` multiplies x (the column), ``freqs[1]`` y (the row), for ``indexing="xy"``.
    Returns a recipe with per-head F (H, 2, P), interleaved layout, (x, y) index coordinates.
    """
    check_tensor("freqs", freqs, min_rank=3)
    if freqs.dim() != 3 or freqs.shape[0] != 2:
        raise ValueError(f"freqs must be one block's (2, H, P) RoPE-Mixed frequencies, got shape {tuple(freqs.shape)}")
    per_head = freqs.detach().to(torch.float64).permute(1, 0, 2).contiguous()  # (H, 2, P)
    return RopeRecipe(per_head, "interleaved", 1.0, Coordinates(kind="index", indexing=indexing))


def rope_mixed_init(
    head_dim: int,
    num_heads: int,
    *,
    depth: int = 1,
    theta: float = 10.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RoPE-Mixed's initial frequencies (2, depth, H, head_dim // 2), float64, as timm's ``init_random_2d_freqs``:
    magnitudes ``theta ** (-4k / head_dim)`` along a random direction per (block, head) and its perpendicular.
    One ``torch.rand(depth, H, 1)`` draw (from ``generator``) gives the directions; feed a block to `rope_mixed`."""
    check_int("num_heads", num_heads)
    check_int("depth", depth)
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be divisible by 4 for RoPE-Mixed")
    theta = check_number("theta", theta)
    magnitude = 1.0 / theta ** (torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)
    angle = torch.rand(depth, num_heads, 1, generator=generator, dtype=torch.float64) * 2 * math.pi
    fx = torch.cat([magnitude * torch.cos(angle), magnitude * torch.cos(angle + math.pi / 2)], dim=-1)
    fy = torch.cat([magnitude * torch.sin(angle), magnitude * torch.sin(angle + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy])


def dinov3(
    head_dim: int,
    *,
    theta: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    normalize: Normalize = "separate",
    grid_offset: float = 0.0,
    indexing: Indexing = "ij",
    rotate_half: bool = True,
) -> RopeRecipe:
    """DINOv3's RoPE (Siméoni et al. 2025, https://arxiv.org/abs/2508.10104; timm ``RotaryEmbeddingDinoV3``).

    Coordinates: patch centres normalised to [-1, 1] (``normalize``: each axis by its own size, or all by the
    largest / smallest). Each axis gets ``head_dim // 4`` frequencies ``2 pi / period_k``, periods
    ``theta ** (k / (head_dim // 4))``, or ``min_period * (max_period / min_period) ** linspace(0, 1)`` when both
    bounds are given. Layout "half" (DINOv3's), or "interleaved" with ``rotate_half=False``. Train-time
    augmentation: ``recipe.positions(shape, shift=..., jitter=..., rescale=...)`` (`ndrope.augment_positions`).
    DINOv3 itself uses (h, w) coordinates (``indexing="ij"``); ``"xy"`` swaps them as timm >= 1.0.31 does
    (earlier timm releases kept (h, w) for DINOv3 whatever ``grid_indexing`` said).
    """
    bands = _bands_per_axis(head_dim, 2)
    if min_period is not None and max_period is not None:
        low, high = check_number("min_period", min_period), check_number("max_period", max_period)
        periods = low * (high / low) ** torch.linspace(0, 1, bands, dtype=torch.float64)
    elif theta is None:
        raise ValueError("dinov3 needs theta, or both min_period and max_period")
    else:
        periods = check_number("theta", theta) ** (2.0 * torch.arange(bands, dtype=torch.float64) / (head_dim // 2))
    band = 2 * math.pi / periods
    coords = Coordinates(kind="centered", offset=grid_offset, normalize=normalize, indexing=indexing)
    return RopeRecipe(block_axial([band, band]), "half" if rotate_half else "interleaved", 1.0, coords)


def rotary_embedding_torch(
    dim: int,
    n_axes: int = 1,
    *,
    freqs_for: FreqsFor = "lang",
    theta: float = 10000.0,
    max_freq: float = 10.0,
    theta_rescale_factor: float = 1.0,
    interpolate_factor: float = 1.0,
) -> RopeRecipe:
    """lucidrains' rotary-embedding-torch ``RotaryEmbedding(dim, freqs_for=...)``: 1D (``rotate_queries_or_keys``)
    or, with ``n_axes > 1``, ``get_axial_freqs(*shape)`` (each axis its own block of ``dim`` channels).

    ``"lang"``: ``theta' ** (-2k / dim)`` with ``theta' = theta * theta_rescale_factor ** (dim / (dim - 2))``;
    ``"pixel"``: ``pi * linspace(1, max_freq / 2, dim // 2)``, on ``linspace(-1, 1)`` coordinates for axial grids.
    ``interpolate_factor`` divides 1D positions (the library ignores it for axial grids). Layout "interleaved".
    """
    check_choice("freqs_for", freqs_for, FreqsFor)
    check_int("dim", dim, minimum=2)
    check_int("n_axes", n_axes)
    interpolate_factor = check_number("interpolate_factor", interpolate_factor)
    if interpolate_factor < 1.0:
        raise ValueError(f"interpolate_factor={interpolate_factor} must be >= 1")
    if freqs_for == "lang":
        base = check_number("theta", theta) * theta_rescale_factor ** (dim / (dim - 2))
        band = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    else:
        band = torch.linspace(1.0, max_freq / 2, dim // 2, dtype=torch.float64) * math.pi
    if n_axes == 1:
        return RopeRecipe(block_axial([band / interpolate_factor]), "interleaved")
    kind = "pixel" if freqs_for == "pixel" else "index"
    return RopeRecipe(block_axial([band] * n_axes), "interleaved", 1.0, Coordinates(kind=kind))
