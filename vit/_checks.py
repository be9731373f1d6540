"""Argument and input validation of `NDRopeVisionTransformer`: every error names the argument, its value
and what is accepted (the model's forward and its packed forward share the input checks).

Shape alphabet: B batch, H heads, N tokens, k prefix tokens (class + registers), C channels.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_origin

import torch
from timm.models import VisionTransformer
from torch import Tensor

from ndrope._checks import check_choice, check_int, check_number

if TYPE_CHECKING:
    from .model import NDRopeVisionTransformer

# timm's own keyword annotations: its Literal choices are checked against timm, never a copy
_TIMM_PARAMETERS = inspect.signature(VisionTransformer.__init__).parameters


def per_axis(name: str, value: Any, ndim: int) -> tuple[int, ...]:
    """An int (used for every axis) or one positive int per axis, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name}={value!r} must be an int or a tuple of ints, one per axis (ndim={ndim})")
    if len(value) != ndim or min(value) < 1:
        raise ValueError(f"{name}={tuple(value)} must have ndim={ndim} positive entries, one per axis")
    return tuple(value)


def check_timm_keywords(kwargs: dict[str, Any]) -> None:
    """The timm keywords timm itself checks only with a bare assert or not at all (torch's Dropout
    already names a bad drop_rate, pos_drop_rate, proj_drop_rate or attn_drop_rate)."""
    for name, value in kwargs.items():
        annotation = _TIMM_PARAMETERS[name].annotation if name in _TIMM_PARAMETERS else None
        if get_origin(annotation) is Literal:  # global_pool, weight_init
            check_choice(name, value, annotation)
    check_int("reg_tokens", kwargs.get("reg_tokens", 0), minimum=0)
    if check_number("patch_drop_rate", kwargs.get("patch_drop_rate", 0.0), minimum=0.0, inclusive=True) >= 1.0:
        raise ValueError(f"patch_drop_rate={kwargs['patch_drop_rate']!r} must be in [0, 1): the fraction of patches dropped")
    if check_number("drop_path_rate", kwargs.get("drop_path_rate", 0.0), minimum=0.0, inclusive=True) > 1.0:
        raise ValueError(f"drop_path_rate={kwargs['drop_path_rate']!r} must be a probability in [0, 1]")


def take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices by timm's convention: None all, an int n the last n, else indices (negative from the end)."""
    if indices is None or isinstance(indices, int):
        last = depth if indices is None else indices
        if not 0 < last <= depth:
            raise ValueError(f"indices={indices} must take between 1 and depth={depth} last blocks")
        return list(range(depth - last, depth))
    taken = [i + depth if i < 0 else i for i in indices]
    if not taken or not all(0 <= i < depth for i in taken):
        raise ValueError(f"indices={list(indices)} must be block indices in [-{depth}, {depth})")
    return taken


def check_images(model: NDRopeVisionTransformer, x: Any, *, name: str = "x", batched: bool = True) -> None:
    """Raise unless ``x`` is what ``model`` takes: (B, C, *spatial) when ``batched``, else one image
    (C, *spatial); floating point at the weights' dtype (or under autocast), every spatial size a
    multiple of the patch size unless the model pads."""
    layout = "(B, C, *spatial)" if batched else "(C, *spatial)"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    rank = model.ndim + (2 if batched else 1)
    shape, spatial, patch = tuple(x.shape), tuple(x.shape[rank - model.ndim :]), tuple(model.patch_embed.patch_size)
    if x.dim() != rank:
        raise ValueError(
            f"{name} has shape {shape} (rank {x.dim()}) but this model has ndim={model.ndim} spatial axes: "
            f"expected rank {rank}, {layout}"
        )
    channels = x.shape[1 if batched else 0]
    if channels != model.in_chans:
        raise ValueError(f"{name} has {channels} channels (shape {shape}) but in_chans={model.in_chans}")
    if (batched and x.shape[0] == 0) or min(spatial) == 0:
        empty = batched and x.shape[0] == 0
        what = "a batch of 0 samples; pass at least one" if empty else f"spatial size {spatial} has an empty axis"
        raise ValueError(f"{name} has shape {shape}: {what}")
    weight = model.patch_embed.proj.weight
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; the model takes floating-point images (e.g. x.float() / 255 for uint8)")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model's weights are {weight.dtype}: cast one to the other "
            f"(x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast"
        )
    if not model.patch_embed.dynamic_img_pad and any(size % p for size, p in zip(spatial, patch)):
        nearest = tuple(max(p, size // p * p) for size, p in zip(spatial, patch))
        raise ValueError(
            f"{name} has spatial size {spatial}, not a multiple of patch_size={patch}: use e.g. {nearest}, "
            f"or build the model with dynamic_img_pad=True to zero-pad"
        )


def check_attn_mask(model: NDRopeVisionTransformer, attn_mask: Any, batch: int, tokens: int) -> None:
    """Raise unless ``attn_mask`` is a bool or float tensor on the model's device that broadcasts to
    (B, H, k + N, k + N) for ``batch`` samples of ``tokens`` tokens."""
    expected = (batch, model.num_heads, tokens, tokens)
    device = model.patch_embed.proj.weight.device
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor broadcastable to (B, H, k + N, k + N) = {expected}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but the model is on {device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; use bool (True = may attend) or an additive float bias")
    try:
        fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, expected) == expected
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"attn_mask has shape {tuple(attn_mask.shape)} but must broadcast to (B, H, k + N, k + N) = {expected} "
            f"({model.num_prefix_tokens} prefix tokens + the patches of this input)"
        )
