"""Patch embeddings that emit the grid channels-last (timm's ``dynamic_img_size`` layout), so the model reads
the grid shape from them: `PatchEmbed2d` (timm's, for images) and `PatchEmbedND` (sequences, video, volumes over time)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import PatchEmbed
from torch import Tensor, nn


def pad_to_patches(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Zero-pad x (B, C, *spatial) at the end of every spatial axis up to a multiple of ``patch_size``."""
    pad = [(-size) % patch for size, patch in zip(x.shape[2:], patch_size)]
    return F.pad(x, [amount for p in reversed(pad) for amount in (0, p)])  # F.pad lists the last axis first


class PatchEmbed2d(PatchEmbed):
    """timm's `PatchEmbed` (same parameters, init and checkpoints): x (B, C, h, w) -> (B, h / p, w / p, embed_dim).

    Always channels-last, as timm builds it for ``dynamic_img_size``. Only the forward differs: timm's formats the input size into its assert messages on every call,
    which makes torch.compile specialise on each resolution (a recompile per size even with
    ``dynamic=True``). The model checks the size once, with an error that names it, before this runs.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_img_pad:
            x = pad_to_patches(x, self.patch_size)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NCHW -> NHWC


class PatchEmbedND(nn.Module):
    """Non-overlapping patches, flattened and projected: x (B, C, *img_size) -> (B, *grid_shape, embed_dim).

    The projection is a Linear over each flattened patch ``(c, p_0, ..., p_{A-1})``, so its weight
    viewed as (embed_dim, C, *patch_size) is exactly the kernel of a ``ConvNd(kernel_size=stride=
    patch_size)``; this also covers A = 4 (volumes over time), for which torch has no convolution.
    Video is (B, C, t, h, w) with ``img_size=(t, h, w)``; a volume over time is (B, C, t, d, h, w).

    The output is channels-last with the grid kept (timm's ``dynamic_img_size`` layout), so the
    model reads the grid shape from it. The constructor takes the arguments timm's
    `VisionTransformer` passes to its ``embed_layer``.

    Args:
        img_size: training input size, one entry per axis; sets ``grid_size`` and ``num_patches``.
        patch_size: one entry per axis (an int is used for every axis).
        in_chans: C, input channels.
        embed_dim: output channels.
        norm_layer: optional norm over the output channels.
        bias: bias of the projection.
        dynamic_img_pad: zero-pad every axis up to a multiple of the patch size instead of rejecting it.
        strict_img_size: only accept inputs of exactly ``img_size``.
        output_fmt: must be ``"NHWC"`` (channels last), the only layout produced.
    """

    def __init__(
        self,
        img_size: Sequence[int],
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        img_size = tuple(img_size)
        n_axes = len(img_size)
        patch_size = (patch_size,) * n_axes if isinstance(patch_size, int) else tuple(patch_size)
        if len(patch_size) != n_axes:
            raise ValueError(f"patch_size={patch_size} must have one entry per axis of img_size={img_size}")
        if output_fmt != "NHWC":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; PatchEmbedND produces 'NHWC' only")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = tuple(size // patch for size, patch in zip(img_size, patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.dynamic_img_pad, self.strict_img_size = dynamic_img_pad, strict_img_size
        axes = [f"(g{a} p{a})" for a in range(n_axes)]
        grid = [f"g{a}" for a in range(n_axes)]
        patch = [f"p{a}" for a in range(n_axes)]
        # e.g. "b c (g0 p0) (g1 p1) (g2 p2) -> b g0 g1 g2 (c p0 p1 p2)"
        self._pattern = f"b c {' '.join(axes)} -> b {' '.join(grid)} (c {' '.join(patch)})"
        self._patch_axes = {name: size for name, size in zip(patch, patch_size)}
        self.proj = nn.Linear(in_chans * math.prod(patch_size), embed_dim, bias=bias, device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype) if norm_layer else nn.Identity()

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, grid_size={self.grid_size}"

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, *spatial) -> (B, *grid_shape, embed_dim) with grid_shape = spatial // patch_size."""
        spatial = tuple(x.shape[2:])
        if self.strict_img_size and spatial != self.img_size:
            raise ValueError(f"input size {spatial} must equal img_size={self.img_size} (strict_img_size=True)")
        if self.dynamic_img_pad:
            x = pad_to_patches(x, self.patch_size)
        return self.norm(self.proj(rearrange(x, self._pattern, **self._patch_axes)))
