"""vit: timm Vision Transformers whose position encoding is one switch, at any input size and ndim.

>>> import vit, timm
>>> model = vit.create_vit("rope_mixed", img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
>>> model = timm.create_model("ndrope_vit_small_patch16_224", pos_embed="rope_axial")

Importing the package registers the ``ndrope_vit_*`` names with timm (`vit.registry`).
"""

from .attention import ROPE_LAYOUT, RopeAttention, RopeBlock
from .model import (
    DEFAULT_POS_EMBED,
    DEFAULT_RESOLUTION_MODE,
    POS_EMBED_CHOICES,
    ROPE_THETA,
    NDRopeVisionTransformer,
    create_vit,
    set_resolution_mode,
)
from .patch_embed import PatchEmbedND
from .pos_embed import (
    AlibiBias,
    FixedPosEmbed,
    alibi_bias,
    alibi_slopes,
    binary_embed,
    integer_embed,
    resample_pos_embed,
    sincos_embed,
)
from .registry import MODEL_NAMES

__all__ = [
    "DEFAULT_POS_EMBED",
    "DEFAULT_RESOLUTION_MODE",
    "MODEL_NAMES",
    "POS_EMBED_CHOICES",
    "ROPE_LAYOUT",
    "ROPE_THETA",
    "AlibiBias",
    "FixedPosEmbed",
    "NDRopeVisionTransformer",
    "PatchEmbedND",
    "RopeAttention",
    "RopeBlock",
    "alibi_bias",
    "alibi_slopes",
    "binary_embed",
    "create_vit",
    "integer_embed",
    "resample_pos_embed",
    "set_resolution_mode",
    "sincos_embed",
]
