"""Token positions: grids, multimodal packed sequences, and train-time coordinate augmentation.

Every function returns positions of shape (N, A): one row per token, one coordinate per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_finite, check_int, check_number, check_position_dtype, check_real, check_shape, check_tensor

#: A multimodal segment: an int is a run of that many text tokens, a tuple is a grid shape.
Segment = int | Sequence[int]


def grid(
    shape: Sequence[int],
    *,
    reference_shape: Sequence[int] | None = None,
    offset: float | Sequence[float] = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Positions (prod(shape), len(shape)) of a row-major grid: text ``(n,)``, image ``(h, w)``,
    video ``(t, h, w)``, volume over time ``(t, d, h, w)``.

    By default coordinates are integer indices ``0 .. size - 1``: at a larger grid than the training
    one, the model sees new, larger positions (extrapolation). With ``reference_shape`` (the training
    grid) coordinates are rescaled to span the reference grid, ``i * reference / size`` (interpolation,
    as EVA-02 does): a 2x finer grid gets half-step positions over the same range.
    ``offset`` (one number, or one per axis) is added to every coordinate.

    >>> grid((2, 3)).tolist()                        # (h, w) = (row, column), row-major
    [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]
    >>> grid((4,), reference_shape=(2,)).flatten().tolist()   # a 2x finer grid over the same range
    [0.0, 0.5, 1.0, 1.5]
    """
    shape = check_shape("shape", shape)
    check_position_dtype("dtype", dtype)
    scale = [1.0] * len(shape)
    if reference_shape is not None:
        reference_shape = check_shape("reference_shape", reference_shape)
        if len(reference_shape) != len(shape):
            raise ValueError(f"reference_shape={reference_shape} must have as many axes as shape={shape}")
        scale = [ref / size for ref, size in zip(reference_shape, shape)]
    offsets = [offset] * len(shape) if isinstance(offset, (int, float)) else offset
    try:
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence) or len(offsets) != len(shape):
            raise ValueError
        offsets = [check_number("offset", o, minimum=None) for o in offsets]
    except (TypeError, ValueError):
        raise ValueError(f"offset={offset!r} must be one finite number or one per axis of shape={shape}") from None
    axes = [
        torch.arange(size, dtype=torch.float64, device=device) * step + shift
        for size, step, shift in zip(shape, scale, offsets)
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, len(shape)).to(dtype)


def _segment_shape(index: int, segment: Segment, n_axes: int) -> tuple[int, ...] | None:
    """None for a text run; otherwise the grid shape padded with leading size-1 axes to n_axes."""
    if isinstance(segment, int) and not isinstance(segment, bool):
        check_int(f"segments[{index}] (text length)", segment)
        return None
    shape = check_shape(f"segments[{index}]", segment)
    if len(shape) > n_axes:
        raise ValueError(f"segments[{index}]={shape} has {len(shape)} axes but n_axes={n_axes}")
    return (1,) * (n_axes - len(shape)) + shape


def multimodal_positions(
    segments: Sequence[Segment],
    n_axes: int | None = None,
    *,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Positions (N, A) of one packed sequence of text runs and grids (the Qwen2-VL M-RoPE rule).

    ``segments`` lists, in order, text runs (an int: that many tokens) and grids (a shape tuple:
    image ``(h, w)``, video ``(t, h, w)``, ...). Shapes with fewer than ``n_axes`` axes get leading
    size-1 axes, so in a 3-axis (t, h, w) RoPE an image is a one-frame video. Give the full shape
    to place axes yourself, e.g. ``(t, 1, h, w)`` for a video in a 4-axis (t, d, h, w) RoPE.

    The rule, with ``s`` the next free index (``start`` at first):
      * a text token takes ``s`` on every axis, then ``s += 1``: text alone is plain 1D RoPE;
      * a grid's token at index ``(i_0, ..., i_{A-1})`` takes ``(s + i_0, ..., s + i_{A-1})``,
        then ``s += max(shape)``: the text after it continues after the grid's largest coordinate.

    >>> multimodal_positions([2, (2, 3), 1], n_axes=3).long().tolist()  # text, a 2 x 3 image, text
    [[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4], [5, 5, 5]]
    """
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or len(segments) == 0:
        raise TypeError(f"segments={segments!r} must be a non-empty list of text lengths (int) and grid shapes (tuple)")
    if n_axes is None:
        n_axes = max([len(s) for s in segments if not isinstance(s, int)] or [1])
    check_int("n_axes", n_axes)
    check_int("start", start, minimum=0)
    check_position_dtype("dtype", dtype)
    parts = []
    next_index = start
    for index, segment in enumerate(segments):
        shape = _segment_shape(index, segment, n_axes)
        if shape is None:
            text = torch.arange(next_index, next_index + segment, dtype=torch.float64, device=device)
            parts.append(text[:, None].expand(-1, n_axes))
            next_index += segment
        else:
            parts.append(grid(shape, offset=float(next_index), dtype=torch.float64, device=device))
            next_index += max(shape)
    return torch.cat(parts, dim=0).to(dtype)


def check_augmentation(
    shift: float, jitter: float, rescale: float, *, names: tuple[str, str, str] = ("shift", "jitter", "rescale")
) -> tuple[float, float, float]:
    """Validate `augment_positions`' settings: shift >= 0, jitter >= 1, rescale >= 1 (0, 1, 1: off);
    errors use ``names`` (a caller's own argument names)."""
    return (
        check_number(names[0], shift, minimum=0.0, inclusive=True),
        check_number(names[1], jitter, minimum=1.0, inclusive=True),
        check_number(names[2], rescale, minimum=1.0, inclusive=True),
    )


def augment_positions(
    positions: Tensor,
    *,
    shift: float = 0.0,
    jitter: float = 1.0,
    rescale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DINOv3's train-time coordinate augmentation (https://arxiv.org/abs/2508.10104); identity by default.

    With one random draw per call (shared by the batch), in DINOv3's order (as timm's
    ``RotaryEmbeddingDinoV3`` does it), positions (..., N, A) become::

        p' = (p + U(-shift, shift)) * exp(U(-log jitter, log jitter)) * exp(U(-log rescale, log rescale))
             per axis                per axis                              one factor for all axes

    The scaling is about the origin of the coordinates: DINOv3 centres them (coordinates in [-1, 1]),
    so there it scales about the centre of the grid; on index grids ``0 .. n - 1`` it scales away from
    the first patch. Relative offsets between patches change only through the scales; the shift moves
    patches relative to unrotated tokens (class token, registers). Returns the same shape in
    float32 at least (float64 stays float64).
    """
    check_tensor("positions", positions, min_rank=2)
    check_real("positions", positions)
    check_position_dtype("positions", positions.dtype)
    shift, jitter, rescale = check_augmentation(shift, jitter, rescale)
    out = positions.to(torch.promote_types(positions.dtype, torch.float32))
    check_finite("positions", out)
    n_axes = out.shape[-1]

    def uniform(size: int, bound: float) -> Tensor:
        draw = torch.rand(size, generator=generator, dtype=torch.float64)
        return ((draw * 2 - 1) * bound).to(device=out.device, dtype=out.dtype)

    if shift > 0.0:
        out = out + uniform(n_axes, shift)
    if jitter > 1.0:
        out = out * uniform(n_axes, math.log(jitter)).exp()
    if rescale > 1.0:
        out = out * uniform(1, math.log(rescale)).exp()
    return out
