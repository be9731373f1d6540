"""The mathematics of N-dimensional rotary position encoding, as pure functions.

One idea carries everything: a token at position ``p`` (one coordinate per axis, shape ``(A,)``) has
each of its ``D // 2`` channel pairs rotated by the angle ``theta_j(p) = sum_a p[a] * F[a, j]``, where
``F`` is a frequency matrix of shape ``(A, D // 2)``. Axial (axis-separated) RoPE is the case where
every column of ``F`` has exactly one non-zero entry; RoPE-Mixed (Heo et al., ECCV 2024,
https://arxiv.org/abs/2403.13298) is a dense, learnable ``F`` per head.

Shape alphabet: B batch, H heads, N tokens, D channels per head, A axes, P = rotated pairs.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import torch
from torch import Tensor

from . import _kernels
from ._checks import check_choice, check_even_dim, check_finite, check_int, check_positive_float, check_tensor

Layout = Literal["half", "interleaved"]
LAYOUTS: tuple[str, ...] = ("half", "interleaved")
#: What `apply_rotary` rotates by: angles (..., N, P), or their precomputed (cos, sin) pair.
Rotation = Union[Tensor, tuple[Tensor, Tensor]]


def split_pairs(pairs: int, n_axes: int, axis_dims: Sequence[int] | None = None) -> tuple[int, ...]:
    """How many of the ``pairs`` channel pairs each axis gets.

    By default as evenly as possible; when ``pairs`` is not divisible by ``n_axes`` the last axes get
    one pair more (for video ``(t, h, w)`` the spatial axes, which carry the finer structure).
    """
    check_int("n_axes", n_axes)
    if axis_dims is None:
        if pairs < n_axes:
            raise ValueError(f"dim // 2={pairs} pairs cannot be shared by n_axes={n_axes} axes; use a larger dim")
        base, extra = divmod(pairs, n_axes)
        return tuple(base + (1 if a >= n_axes - extra else 0) for a in range(n_axes))
    axis_dims = tuple(axis_dims)
    if len(axis_dims) != n_axes:
        raise ValueError(f"axis_dims={axis_dims} must have one entry per axis (n_axes={n_axes})")
    for size in axis_dims:
        check_int("axis_dims entry", size)
    if sum(axis_dims) != pairs:
        raise ValueError(f"axis_dims={axis_dims} must add up to dim // 2={pairs} pairs, got {sum(axis_dims)}")
    return axis_dims


def _ladder(size: int, theta: float) -> Tensor:
    """``theta ** (-k / size)`` for k < size: the 1D ladder ``1 / theta^(2i/d)`` with d = 2 * size."""
    return theta ** (-torch.arange(size, dtype=torch.float64) / size)


def axial_frequencies(
    dim: int,
    n_axes: int,
    *,
    theta: float = 10000.0,
    axis_dims: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Axis-separated frequency matrix F (A, D // 2): axis ``a`` owns a contiguous block of pairs.

    ``axis_dims`` gives the number of pairs per axis (must add up to ``dim // 2``). With ``n_axes=1``
    this is exactly the 1D RoPE of Su et al. (Llama uses ``theta=500000``, ViTs often 100).
    """
    check_even_dim("dim", dim)
    theta = check_positive_float("theta", theta)
    sizes = split_pairs(dim // 2, n_axes, axis_dims)
    freqs = torch.zeros(n_axes, dim // 2, dtype=torch.float64)
    start = 0
    for axis, size in enumerate(sizes):
        freqs[axis, start : start + size] = _ladder(size, theta)
        start += size
    return freqs.to(dtype)


def mixed_frequencies(
    dim: int,
    n_axes: int,
    num_heads: int,
    *,
    theta: float = 10.0,
    axis_dims: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RoPE-Mixed initialisation (H, A, D // 2), generalised from 2D to any number of axes.

    Per head, a random orthonormal basis of the A-dimensional position space is drawn (Haar); pair
    block ``i`` gets the frequency vectors ``ladder[k] * basis[i]``. In 2D this is Heo et al.'s init:
    directions ``phi`` and ``phi + pi/2`` with magnitudes ``theta ** (-4k / dim)``. Wrap the result in
    an ``nn.Parameter`` to learn it.
    """
    check_even_dim("dim", dim)
    check_int("num_heads", num_heads)
    theta = check_positive_float("theta", theta)
    sizes = split_pairs(dim // 2, n_axes, axis_dims)
    gaussian = torch.randn(num_heads, n_axes, n_axes, generator=generator, dtype=torch.float64)
    basis, upper = torch.linalg.qr(gaussian)
    basis = basis * torch.sign(torch.diagonal(upper, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar, not QR-biased
    columns = []
    for direction, size in enumerate(sizes):
        columns.append(basis[:, :, direction, None] * _ladder(size, theta))  # (H, A, size)
    return torch.cat(columns, dim=-1).to(dtype)


def ladder_fraction(sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Per pair (P,), its place ``k / (m - 1)`` in its axis's ladder of m pairs: 0 = fastest, 1 = slowest."""
    parts = [torch.arange(m, dtype=torch.float64) / max(m - 1, 1) for m in sizes]
    return torch.cat(parts).to(dtype)


def ntk_scaled_frequencies(freqs: Tensor, scale: Sequence[float], fraction: Tensor) -> Tensor:
    """NTK-aware rescaling of ``theta`` for a grid ``scale`` times the training grid, per axis.

    For one axis with m pairs, ``theta' = theta * s ** (m / (m - 1))`` turns pair k's frequency into
    ``f_k * s ** (-k / (m - 1))``: the fastest pair keeps its frequency, the slowest is divided by s.
    A mixed column uses the scales of the axes it points along (weights ``F[a, j]^2 / |F[:, j]|^2``),
    which is exact for axial ``F``. Scales below 1 are clamped to 1 (no shrinking when the grid is
    smaller than the training grid).

    Args: freqs (A, P) or (H, A, P); scale: A numbers; fraction (P,) from `ladder_fraction`.
    """
    check_tensor("freqs", freqs, min_rank=2)
    if len(scale) != freqs.shape[-2]:
        raise ValueError(f"scale={tuple(scale)} must have one entry per axis ({freqs.shape[-2]})")
    log_scale = torch.log(torch.tensor(scale, dtype=freqs.dtype, device=freqs.device).clamp(min=1.0))
    weight = freqs.square() / freqs.square().sum(dim=-2, keepdim=True).clamp(min=torch.finfo(freqs.dtype).tiny)
    column_log_scale = (weight * log_scale[:, None]).sum(dim=-2)  # (..., P)
    factor = torch.exp(-fraction.to(freqs) * column_log_scale)
    return freqs * factor.unsqueeze(-2)


def _angle_dtype(positions: Tensor, freqs: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (positions.dtype, freqs.dtype) else torch.float32


def angles(positions: Tensor, freqs: Tensor, *, check_finite_positions: bool = True) -> Tensor:
    """Rotation angles ``positions @ F``.

    Args:
        positions: (..., N, A) coordinates (any real dtype).
        freqs: (A, P) shared by all heads, or (H, A, P) per head.
        check_finite_positions: reject NaN/inf positions; this costs a device sync on GPU, so
            callers whose positions are finite by construction (`grid`) may skip it.
    Returns:
        (..., N, P) for shared freqs, (..., H, N, P) for per-head freqs; broadcastable against
        q/k of shape (B, H, N, D). float64 when either input is float64. Otherwise float32, computed
        in float64 and reduced modulo 2*pi first, so positions up to ~1e7 keep ~1e-7 rad accuracy
        (plain float32 would lose ~1e-2 rad at 1e5); the rotation is unchanged by the reduction.
    """
    check_tensor("positions", positions, min_rank=2)
    check_tensor("freqs", freqs, min_rank=2)
    if freqs.dim() > 3:
        raise ValueError(f"freqs must be (A, P) or (H, A, P), got shape {tuple(freqs.shape)}")
    if positions.shape[-1] != freqs.shape[-2]:
        raise ValueError(
            f"positions has {positions.shape[-1]} coordinates per token (shape {tuple(positions.shape)}) but "
            f"freqs has n_axes={freqs.shape[-2]} (shape {tuple(freqs.shape)}); they must match"
        )
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be a real (integer or floating) tensor, got dtype {positions.dtype}")
    if check_finite_positions:
        check_finite("positions", positions)
    out_dtype = _angle_dtype(positions, freqs)
    wide = torch.float64 if positions.device.type != "mps" else torch.float32
    pos = positions.to(wide)
    fr = freqs.to(wide)
    if fr.dim() == 3:
        pos = pos.unsqueeze(-3)  # (..., 1, N, A) against (H, A, P)
    theta = pos @ fr
    if out_dtype == torch.float32 and wide == torch.float64:
        theta = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
    return theta.to(out_dtype)


def cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
    """The (cos, sin) pair of ``angles``, to compute once per forward and share between layers."""
    check_tensor("angles", angles, min_rank=1)
    if not angles.is_floating_point():
        raise TypeError(f"angles must be a floating-point tensor, got dtype {angles.dtype}")
    return torch.cos(angles), torch.sin(angles)


def _as_cos_sin(rotation: Rotation) -> tuple[Tensor, Tensor]:
    if isinstance(rotation, Tensor):
        return cos_sin(rotation)
    if isinstance(rotation, (tuple, list)) and len(rotation) == 2 and all(isinstance(t, Tensor) for t in rotation):
        cos, sin = rotation
        if cos.shape != sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
        return cos, sin
    raise TypeError(f"angles must be a Tensor of angles or a (cos, sin) pair of Tensors, got {type(rotation).__name__}")


def check_rotation_shapes(x: Tensor, cos: Tensor) -> None:
    """Validate that (..., N, P) cos/sin fits x (..., N, D): 2P <= D, same N, broadcastable batch."""
    check_tensor("x", x, min_rank=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if cos.dim() < 2:
        raise ValueError(f"angles must be (..., N, P), got shape {tuple(cos.shape)}")
    pairs, head_dim = cos.shape[-1], x.shape[-1]
    if 2 * pairs > head_dim:
        raise ValueError(
            f"angles rotate {pairs} pairs = {2 * pairs} channels but x has only D={head_dim} channels "
            f"(x shape {tuple(x.shape)}, angles shape {tuple(cos.shape)})"
        )
    if cos.shape[-2] not in (1, x.shape[-2]):
        raise ValueError(
            f"angles are for {cos.shape[-2]} tokens but x has N={x.shape[-2]} tokens "
            f"(x shape {tuple(x.shape)}, angles shape {tuple(cos.shape)})"
        )
    try:
        torch.broadcast_shapes(x.shape[:-2], cos.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"angles leading dims {tuple(cos.shape[:-2])} do not broadcast against x leading dims "
            f"{tuple(x.shape[:-2])}; per-head angles are (H, N, P) for x (B, H, N, D)"
        ) from None


def rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, layout: Layout) -> Tensor:
    """Plain autograd implementation of the rotation; the definition every fast path is tested against."""
    pairs = cos.shape[-1]
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    rotated = x[..., : 2 * pairs].to(compute)
    cos, sin = cos.to(compute), sin.to(compute)
    if layout == "half":
        x1, x2 = rotated[..., :pairs], rotated[..., pairs:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = out.to(x.dtype)
    if 2 * pairs < x.shape[-1]:
        out = torch.cat((out, x[..., 2 * pairs :]), dim=-1)
    return out


def apply_rotary(x: Tensor, angles: Rotation, *, layout: Layout = "half") -> Tensor:
    """Rotate x (..., N, D) by angles (..., N, P), or by a precomputed (cos, sin) pair.

    Heads come before tokens, as ``F.scaled_dot_product_attention`` takes them: x (B, H, N, D) with
    angles (N, P) shared by heads or (H, N, P) per head. Only the first ``2 * P`` channels rotate
    (partial rotation); the rest pass through. ``layout="half"`` pairs channel j with j + P
    (GPT-NeoX, Llama in transformers), ``layout="interleaved"`` pairs 2j with 2j + 1 (Meta's complex
    form). Returns x's shape and dtype; the math runs in at least float32.
    """
    check_choice("layout", layout, LAYOUTS)
    cos, sin = _as_cos_sin(angles)
    check_rotation_shapes(x, cos)
    # a one-pass kernel whose backward saves only cos/sin; NDROPE_BACKEND=reference selects the formula
    backend = _kernels.resolve_backend(x)
    if backend == "reference":
        return rotate_reference(x, cos, sin, layout)
    return _kernels.rotate(x, cos, sin, interleaved=layout == "interleaved", backend=backend)
