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
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _ops, _sharding
from ._checks import (
    check_choice,
    check_even_dim,
    check_finite,
    check_floating,
    check_int,
    check_number,
    check_position_dtype,
    check_real,
    check_same_device,
    check_tensor,
)

#: Channel pairing: ``"half"`` rotates (j, j + P) (GPT-NeoX, Llama in transformers), ``"interleaved"``
#: rotates (2j, 2j + 1) (Meta's complex form). They agree up to a fixed permutation of the channels.
Layout = Literal["half", "interleaved"]
#: What `apply_rotary` rotates by: angles (..., N, P), or their precomputed (cos, sin) pair.
Rotation = Tensor | tuple[Tensor, Tensor]


def _split_pairs(pairs: int, n_axes: int, axis_dims: Sequence[int] | None) -> tuple[int, ...]:
    """How many of the ``pairs`` channel pairs each axis gets: as even as possible, the last axes
    getting one more (for video (t, h, w) the spatial axes), unless ``axis_dims`` says otherwise."""
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


def _ladder(size: int, theta: float, device: torch.device | str | None) -> Tensor:
    """``theta ** (-k / size)`` for k < size, in float64: the 1D ladder ``1 / theta^(2i/d)`` with d = 2 * size."""
    return theta ** (-torch.arange(size, dtype=torch.float64, device=device) / size)


def axial_frequencies(
    dim: int,
    n_axes: int,
    *,
    theta: float = 10000.0,
    axis_dims: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Axis-separated frequency matrix F (A, D // 2): axis ``a`` owns a contiguous block of pairs with
    its own ladder ``theta ** (-k / m_a)``.

    ``axis_dims`` gives the number of pairs per axis (must add up to ``dim // 2``). With ``n_axes=1``
    this is exactly the 1D RoPE of Su et al. (Llama uses ``theta=500000``, ViTs often 100). float64 by
    default: rounding F to float32 costs 3e-3 rad at position 1e5; `angles` computes in float64 anyway.
    """
    check_even_dim("dim", dim)
    theta = check_number("theta", theta)
    sizes = _split_pairs(dim // 2, n_axes, axis_dims)
    return _block_frequencies([_ladder(size, theta, device) for size in sizes]).to(dtype)


def _block_frequencies(bands: Sequence[Tensor]) -> Tensor:
    """F (A, sum P_a) in float64: axis a owns a contiguous block of pairs holding ``bands[a]`` (P_a,),
    axis-major as timm lays it out; zero elsewhere. The layout of `axial_frequencies` and of the
    vision recipes."""
    device = bands[0].device if bands else None
    freqs = torch.zeros(len(bands), sum(band.numel() for band in bands), dtype=torch.float64, device=device)
    start = 0
    for axis, band in enumerate(bands):
        freqs[axis, start : start + band.numel()] = band
        start += band.numel()
    return freqs


def mixed_frequencies(
    dim: int,
    n_axes: int,
    num_heads: int,
    *,
    theta: float = 10.0,
    axis_dims: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RoPE-Mixed initialisation (H, A, D // 2), generalised from 2D to any number of axes.

    Per head, a random orthonormal basis of the A-dimensional position space is drawn (Haar); the
    block of pairs of direction ``i`` gets the frequency vectors ``ladder[k] * basis[:, i]``. In 2D the
    basis is a rotation or a reflection, so the two directions are ``phi`` and ``phi + pi/2`` or
    ``phi - pi/2`` (both orientations occur; as axes of a rotation they are equivalent), with
    magnitudes ``theta ** (-k / m)``: Heo et al.'s initialisation. Wrap it in an ``nn.Parameter``
    (or use `RotaryEmbedding.mixed`) to learn it. Drawn on the CPU (``generator`` is a CPU generator).
    """
    check_even_dim("dim", dim)
    check_int("num_heads", num_heads)
    theta = check_number("theta", theta)
    sizes = _split_pairs(dim // 2, n_axes, axis_dims)
    gaussian = torch.randn(num_heads, n_axes, n_axes, generator=generator, dtype=torch.float64, device="cpu")
    basis, upper = torch.linalg.qr(gaussian)
    basis = basis * torch.sign(torch.diagonal(upper, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar, not QR-biased
    columns = [basis[:, :, direction, None] * _ladder(size, theta, "cpu") for direction, size in enumerate(sizes)]
    return torch.cat(columns, dim=-1).to(device=device, dtype=dtype)


def ntk_scaled_frequencies(freqs: Tensor, scale: Sequence[float]) -> Tensor:
    """NTK-aware rescaling of ``theta`` for a grid ``scale`` times the training grid, per axis.

    For one axis whose ladder has m pairs, ``theta' = theta * s ** (m / (m - 1))`` turns pair k's
    frequency into ``f_k * s ** (-k / (m - 1))``: the fastest pair keeps its frequency, the slowest is
    divided by s. A pair's place ``k / (m - 1)`` is read off the magnitudes,
    ``log(f_max / f_k) / log(f_max / f_min)`` among the pairs of its axis (its largest component), which
    is exact for `axial_frequencies` and follows the ladder of each direction for `mixed_frequencies`.
    A mixed column uses the scales of the axes it points along (weights ``F[a, j]^2 / |F[:, j]|^2``).
    Scales below 1 are clamped to 1 (no shrinking for grids smaller than the training grid);
    zero-frequency pairs stay zero.

    Args: freqs (A, P) or (H, A, P); scale: A positive finite numbers. Returns freqs' shape and dtype.
    """
    check_tensor("freqs", freqs, min_rank=2)
    check_floating("freqs", freqs)
    check_finite("freqs", freqs)
    n_axes = freqs.shape[-2]
    if n_axes == 0:
        raise ValueError(f"freqs {tuple(freqs.shape)} has no axes; it must be (A, P) or (H, A, P) with A >= 1")
    if isinstance(scale, (str, bytes)) or not isinstance(scale, Sequence) or len(scale) != n_axes:
        raise ValueError(f"scale={scale!r} must be a sequence of {n_axes} numbers, one per axis of freqs {tuple(freqs.shape)}")
    for value in scale:
        check_number("scale entry", value)
    if freqs.shape[-1] == 0:
        return freqs.clone()
    wide = freqs.to(torch.float64)
    log_scale = torch.log(torch.tensor(scale, dtype=torch.float64, device=freqs.device).clamp(min=1.0))
    magnitude = wide.square().sum(dim=-2)  # (..., P): squared column norms
    nonzero = magnitude > 0
    weight = wide.square() / magnitude.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-2)
    column_log_scale = (weight * log_scale[:, None]).sum(dim=-2)  # (..., P)
    log_magnitude = 0.5 * torch.log(magnitude.clamp(min=torch.finfo(torch.float64).tiny))
    owner = wide.abs().argmax(dim=-2)  # (..., P): the axis each pair points along most
    fraction = torch.zeros_like(magnitude)
    for axis in range(n_axes):
        member = (owner == axis) & nonzero
        high = torch.where(member, log_magnitude, -math.inf).amax(dim=-1, keepdim=True)
        low = torch.where(member, log_magnitude, math.inf).amin(dim=-1, keepdim=True)
        span = (high - low).clamp(min=1e-300)
        fraction = torch.where(member & (high > low), (high - log_magnitude) / span, fraction)
    factor = torch.exp(-fraction * column_log_scale)
    return (wide * factor.unsqueeze(-2)).to(freqs.dtype)


def angles(positions: Tensor, freqs: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Rotation angles ``positions @ F``.

    Args:
        positions: (..., N, A) coordinates, on freqs' device: float32, float64 or integers (bfloat16 and
            float16 are refused: they round ordinary positions; int64 beyond 2**53 too: float64 rounds it).
        freqs: (A, P) shared by all heads, or (H, A, P) per head.
        dtype: the result's dtype; default float64 for float64 positions, float32 otherwise.
    Returns:
        (..., N, P) for shared freqs, (..., H, N, P) for per-head freqs; broadcastable against
        q/k of shape (B, H, N, D). Always computed in float64; a float32 result is first reduced
        modulo 2*pi, so it is within ~4e-7 rad of the exact angle at any position up to ~1e9 (with
        float64 freqs: float32 freqs are themselves off by ~3e-8 relative).
    """
    check_tensor("positions", positions, min_rank=2)
    check_tensor("freqs", freqs, min_rank=2)
    check_real("positions", positions)
    check_position_dtype("positions", positions.dtype)
    check_floating("freqs", freqs)
    if freqs.dim() > 3:
        raise ValueError(f"freqs must be (A, P) or (H, A, P), got shape {tuple(freqs.shape)}")
    if positions.shape[-1] != freqs.shape[-2]:
        raise ValueError(
            f"positions has {positions.shape[-1]} coordinates per token (shape {tuple(positions.shape)}) but "
            f"freqs has n_axes={freqs.shape[-2]} (shape {tuple(freqs.shape)}); they must match"
        )
    check_same_device("positions", positions, "freqs", freqs)
    check_finite("positions", positions, ("freqs", freqs))  # one device sync on GPU; grids skip it (`_phase`)
    if dtype is None:
        dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    elif not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype} must be a floating-point dtype")
    return _phase(positions, freqs, dtype)


def _phase(positions: Tensor, freqs: Tensor, dtype: torch.dtype) -> Tensor:
    """`angles` without validation, for positions that are valid by construction (`grid`)."""
    wide = torch.float64 if positions.device.type != "mps" else torch.float32  # MPS has no float64
    pos, fr = positions.to(wide), freqs.to(wide)
    if fr.dim() == 3:
        pos = pos.unsqueeze(-3)  # (..., 1, N, A) against (H, A, P)
    phase = pos @ fr
    if dtype != torch.float64 and wide == torch.float64:
        phase = torch.remainder(phase + math.pi, 2 * math.pi) - math.pi
    return phase.to(dtype)


def cos_sin(phase: Tensor) -> tuple[Tensor, Tensor]:
    """The (cos, sin) pair of angles ``phase`` (..., N, P): compute once per forward, share between layers."""
    check_tensor("phase", phase, min_rank=1)
    check_floating("phase", phase)
    return torch.cos(phase), torch.sin(phase)


def _as_cos_sin(rotation: Rotation) -> tuple[Tensor, Tensor]:
    if isinstance(rotation, Tensor):
        check_floating("rotation", rotation)
        return cos_sin(rotation)
    if isinstance(rotation, (tuple, list)) and len(rotation) == 2 and all(isinstance(t, Tensor) for t in rotation):
        cos, sin = rotation
        check_floating("cos", cos)
        check_floating("sin", sin)
        if cos.shape != sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
        check_same_device("sin", sin, "cos", cos)
        return cos, sin
    raise TypeError(
        f"rotation must be a Tensor of angles or a (cos, sin) pair of Tensors, got {type(rotation).__name__}"
    )


def _output_rows(x: Tensor, cos: Tensor, name: str = "x") -> tuple[int, ...]:
    """The rows (..., N) of the result; validates that cos (..., N, P) fits ``x`` (..., N, D)."""
    check_tensor(name, x, min_rank=2)
    check_floating(name, x)
    if cos.dim() < 2:
        raise ValueError(f"the rotation must be (..., N, P), got shape {tuple(cos.shape)}")
    pairs, head_dim = cos.shape[-1], x.shape[-1]
    if 2 * pairs > head_dim:
        raise ValueError(
            f"the rotation turns {pairs} pairs = {2 * pairs} channels but {name} has only D={head_dim} channels "
            f"({name} shape {tuple(x.shape)}, rotation shape {tuple(cos.shape)})"
        )
    if cos.shape[-2] not in (1, x.shape[-2]):
        raise ValueError(
            f"the rotation is for {cos.shape[-2]} tokens but {name} has N={x.shape[-2]} tokens "
            f"({name} shape {tuple(x.shape)}, rotation shape {tuple(cos.shape)})"
        )
    lead_x, lead_cos = x.shape[:-2], cos.shape[:-2]
    if len(lead_cos) <= len(lead_x) and all(c in (1, s) for c, s in zip(reversed(lead_cos), reversed(lead_x))):
        return tuple(x.shape[:-1])  # the common case, without torch.broadcast_shapes' overhead
    try:
        return (*torch.broadcast_shapes(lead_x, lead_cos), x.shape[-2])
    except RuntimeError:
        raise ValueError(
            f"the rotation's leading dims {tuple(lead_cos)} do not broadcast against {name}'s leading dims "
            f"{tuple(lead_x)}; per-head rotations are (H, N, P) for {name} (B, H, N, D)"
        ) from None


def _op_tables(cos: Tensor, sin: Tensor, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin as the op takes them: in the compute dtype, unit stride on the last dim."""
    if cos.dtype != compute or sin.dtype != compute:
        cos, sin = cos.to(compute), sin.to(compute)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()  # small tables; the kernels want unit-stride pairs
    return cos, sin


def _op_input(x: Tensor, rows: tuple[int, ...]) -> Tensor:
    """x as the op takes it: unit stride on the last dim, expanded to the result's rows."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if rows != tuple(x.shape[:-1]):
        x = x.expand(*rows, x.shape[-1])
    return x


def apply_rotary(x: Tensor, rotation: Rotation, *, layout: Layout = "half") -> Tensor:
    """Rotate x (..., N, D) by angles (..., N, P), or by their precomputed (cos, sin) pair.

    Heads come before tokens, as ``F.scaled_dot_product_attention`` takes them: x (B, H, N, D) with a
    rotation (N, P) shared by heads or (H, N, P) per head. Only the first ``2 * P`` channels rotate
    (partial rotation); the rest pass through. Pairs by ``layout``:
        half:        [x_0 .. x_{P-1} | x_P .. x_{2P-1}] -> [x_j c_j - x_{j+P} s_j | x_{j+P} c_j + x_j s_j]
        interleaved: [x_0 x_1 x_2 x_3 ..]               -> [x_0 c_0 - x_1 s_0, x_1 c_0 + x_0 s_0, ..]
    The math runs in at least float32 (the rotation's dtype, if wider); returns x's dtype, and the
    broadcast shape of x and the rotation (x's shape unless the rotation has more leading dims).
    One registered op (``ndrope::rotate``): a one-pass C++ kernel on CPU and a one-pass Triton kernel
    on CUDA, whose backward saves only cos/sin; ``torch.compile``, ``torch.export``, fake tensors and
    ``torch.func`` work through it. x may be any strided view (q of a packed qkv projection): only a
    last dim that is not unit-stride is copied.
    """
    check_choice("layout", layout, Layout)
    cos, sin = _as_cos_sin(rotation)
    if (type(x) is not Tensor or type(cos) is not Tensor) and not torch.compiler.is_compiling():
        _sharding.register()  # a DTensor (or another subclass): DTensor needs the op's sharding rules
    rows = _output_rows(x, cos)
    check_same_device("the rotation", cos, "x", x)
    compute = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32  # x, cos are floating
    cos, sin = _op_tables(cos, sin, compute)
    x = _op_input(x, rows)
    interleaved = layout == "interleaved"
    if _ops.traces_formula():  # torch.compile fuses it (`ndrope.set_compiled_rotation`)
        return _ops._rotate_formula(x, cos, sin, interleaved, False)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if differentiable and not torch.jit.is_tracing():  # TorchScript records the op, not a Python Function
        return _ops.Rotate.apply(x, cos, sin, interleaved, False)
    return _ops.rotate(x, cos, sin, interleaved, False)  # the same op, without autograd.Function's ~15 us


def apply_rotary_pair(q: Tensor, k: Tensor, rotation: Rotation, *, layout: Layout = "half") -> tuple[Tensor, Tensor]:
    """Rotate q and k (..., N, D) by the same rotation: ``(apply_rotary(q, ...), apply_rotary(k, ...))``
    in one call (``ndrope::rotate_pair``). On CUDA, q and k of one shape, strides and dtype (as in
    self-attention) go through one kernel launch; q and k may also differ in heads (grouped-query
    attention) as long as the rotation broadcasts against each.
    """
    check_choice("layout", layout, Layout)
    cos, sin = _as_cos_sin(rotation)
    if (type(q) is not Tensor or type(cos) is not Tensor) and not torch.compiler.is_compiling():
        _sharding.register()  # a DTensor: DTensor needs the ops' sharding rules
    rows_q, rows_k = _output_rows(q, cos, "q"), _output_rows(k, cos, "k")
    check_same_device("the rotation", cos, "q", q)
    check_same_device("k", k, "q", q)
    compute = torch.float64 if torch.float64 in (q.dtype, k.dtype, cos.dtype) else torch.float32
    cos, sin = _op_tables(cos, sin, compute)
    q, k = _op_input(q, rows_q), _op_input(k, rows_k)
    interleaved = layout == "interleaved"
    if _ops.traces_formula():
        return _ops._rotate_formula(q, cos, sin, interleaved, False), _ops._rotate_formula(k, cos, sin, interleaved, False)
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos.requires_grad or sin.requires_grad)
    if differentiable and not torch.jit.is_tracing():
        return _ops.RotatePair.apply(q, k, cos, sin, interleaved, False)
    return _ops.rotate_pair(q, k, cos, sin, interleaved, False)
