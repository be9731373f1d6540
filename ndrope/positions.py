"""Token positions: grids, multimodal packed sequences, and train-time coordinate augmentation.

Every function returns positions of shape (N, A): one row per token, one coordinate per axis.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from ._checks import check_finite, check_int, check_shape, check_tensor

#: A multimodal segment: an int is a run of that many text tokens, a tuple is a grid shape.
Segment = Union[int, Sequence[int]]


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
    """
    shape = check_shape("shape", shape)
    scale = [1.0] * len(shape)
    if reference_shape is not None:
        reference_shape = check_shape("reference_shape", reference_shape)
        if len(reference_shape) != len(shape):
            raise ValueError(f"reference_shape={reference_shape} must have as many axes as shape={shape}")
        scale = [ref / size for ref, size in zip(reference_shape, shape)]
    offsets = [float(offset)] * len(shape) if isinstance(offset, (int, float)) else [float(o) for o in offset]
    if len(offsets) != len(shape) or not all(math.isfinite(o) for o in offsets):
        raise ValueError(f"offset={offset!r} must be one finite number or one per axis of shape={shape}")
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

    Example, 3 axes: ``multimodal_positions([2, (2, 3), 1], n_axes=3)`` gives
    text ``(0,0,0) (1,1,1)``, the image ``(2,2,2) (2,2,3) (2,2,4) (2,3,2) (2,3,3) (2,3,4)``,
    then text ``(5,5,5)``.
    """
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or len(segments) == 0:
        raise TypeError(f"segments={segments!r} must be a non-empty list of text lengths (int) and grid shapes (tuple)")
    if n_axes is None:
        n_axes = max([len(s) for s in segments if not isinstance(s, int)] or [1])
    check_int("n_axes", n_axes)
    check_int("start", start, minimum=0)
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


def augment_positions(
    positions: Tensor,
    *,
    shift: float = 0.0,
    jitter: float = 1.0,
    rescale: float = 1.0,
    generator: torch.Generator | None = None,
    check_finite_positions: bool = True,
) -> Tensor:
    """Random coordinate augmentation for training (as DINOv3 trains its RoPE); identity by default.

    Positions (..., N, A) are, with one random draw per call (shared by the batch):
      * scaled about their centre per axis by ``exp(U(-log jitter, log jitter))`` (jitter >= 1),
      * scaled about their centre, all axes together, by ``exp(U(-log rescale, log rescale))``,
      * shifted per axis by ``U(-shift, shift)`` grid steps.
    Relative offsets between patches change only through the scales; the shift moves the patches
    relative to unrotated tokens (class token, registers). Returns the same shape, float32 at least.
    ``check_finite_positions=False`` skips the NaN/inf check (a device sync on GPU).
    """
    check_tensor("positions", positions, min_rank=2)
    for name, value, low in (("shift", shift, 0.0), ("jitter", jitter, 1.0), ("rescale", rescale, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise ValueError(f"{name}={value!r} must be a finite number >= {low}")
    n_axes = positions.shape[-1]
    out = positions.to(torch.promote_types(positions.dtype, torch.float32))
    if check_finite_positions:
        check_finite("positions", out)
    if shift == 0.0 and jitter == 1.0 and rescale == 1.0:
        return out

    def uniform(size: int, bound: float) -> Tensor:
        return (torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    scale = torch.exp(uniform(n_axes, math.log(jitter)) + uniform(1, math.log(rescale)))
    offset = uniform(n_axes, shift)
    center = out.flatten(0, -2).mean(dim=0)
    scale, offset = scale.to(out), offset.to(out)
    return (out - center) * scale + center + offset
