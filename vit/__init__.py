"""vit: timm Vision Transformers whose position encoding is one switch, at any input size and ndim.

>>> import vit, timm, torch
>>> model = vit.NDRopeVisionTransformer("rope_mixed", img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
>>> model = timm.create_model("ndrope_vit_small_patch16_224", pos_embed="rope_axial")

Importing the package registers the ``ndrope_vit_*`` names with timm (`vit.registry`). Images of several
sizes run as one packed batch with ``model.forward_packed(images)`` (`vit.packing`); `vit.sizes` checks
and draws the image sizes of multi-resolution training.
"""

try:  # the `vit` extra: say which one, not just "No module named 'timm'"
    import einops  # noqa: F401
    import timm  # noqa: F401
except ModuleNotFoundError as error:
    if error.name not in ("einops", "timm"):
        raise
    raise ModuleNotFoundError(
        f"vit needs {error.name}, which is not installed: pip install \"ndrope-vit[vit]\" (in a checkout: "
        f"pip install -e \".[vit]\"); ndrope itself needs only torch",
        name=error.name,
    ) from None

from .attention import (
    ATTN_LOGIT_SCALE_CHOICES,
    ROPE_LAYOUT,
    AttnLogitScale,
    BlockInputs,
    RopeAttention,
    RopeBlock,
    log_length_scale,
)
from .model import (
    DEFAULT_POS_EMBED,
    POS_EMBED_CHOICES,
    NDRopeVisionTransformer,
    applicable_resolution_modes,
)
from .packing import PackedLayout, plan_packing
from .patch_embed import PatchEmbed2d, PatchEmbedND
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
from .rope import DEFAULT_RESOLUTION_MODE, ROPE_THETA, RopePlan, VisionRecipe, create_rope
from .sizes import check_image_sizes, draw_image_size, image_sizes_between

__all__ = [
    "ATTN_LOGIT_SCALE_CHOICES",
    "DEFAULT_POS_EMBED",
    "DEFAULT_RESOLUTION_MODE",
    "MODEL_NAMES",
    "POS_EMBED_CHOICES",
    "ROPE_LAYOUT",
    "ROPE_THETA",
    "AlibiBias",
    "AttnLogitScale",
    "BlockInputs",
    "FixedPosEmbed",
    "NDRopeVisionTransformer",
    "PackedLayout",
    "PatchEmbed2d",
    "PatchEmbedND",
    "RopeAttention",
    "RopeBlock",
    "RopePlan",
    "VisionRecipe",
    "alibi_bias",
    "alibi_slopes",
    "applicable_resolution_modes",
    "binary_embed",
    "check_image_sizes",
    "create_rope",
    "draw_image_size",
    "image_sizes_between",
    "integer_embed",
    "log_length_scale",
    "plan_packing",
    "resample_pos_embed",
    "sincos_embed",
]
