"""`ViTSpec`: the network of an experiment as plain, linkable fields, built with `vit.create_vit`.

A dataclass rather than a ``class_path``: jsonargparse cannot link arguments (img_size, num_classes,
in_chans from the data) into a function's init_args (``vit.create_vit``), and through the class
(``vit.NDRopeVisionTransformer``) it would pass every timm default explicitly, which vit rejects
(e.g. timm's ``attn_layer``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import vit
from torch import nn


@dataclass
class ViTSpec:
    """Arguments of `vit.create_vit`; ``img_size``, ``num_classes`` and ``in_chans`` come from the data in train.py.

    Attributes:
        pos_embed: position encoding, one of `vit.POS_EMBED_CHOICES`.
        patch_size: patch side in pixels; every training and evaluation resolution is a multiple of it.
        embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads and MLP expansion.
        global_pool: ``"token"`` (class token) or ``"avg"`` (mean of the patch tokens).
        drop_path_rate: stochastic depth rate of the last block (linearly increasing from 0).
        img_size: training resolution (the positions' reference grid is img_size // patch_size per side).
        num_classes, in_chans: classifier outputs and image channels.
        extra: any further keyword arguments for `vit.create_vit`.
    """

    pos_embed: str = "rope_axial"
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    global_pool: Literal["token", "avg"] = "token"
    drop_path_rate: float = 0.0
    img_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The timm VisionTransformer: images (B, in_chans, r, r) -> logits (B, num_classes), r % patch_size == 0."""
        if self.pos_embed not in vit.POS_EMBED_CHOICES:
            raise ValueError(f"pos_embed={self.pos_embed!r} is not one of {list(vit.POS_EMBED_CHOICES)}")
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return vit.create_vit(**kwargs, **self.extra)
