"""Named recipes that reproduce established RoPE schemes exactly, each one call.

A recipe returns a `RopeRecipe`: frequencies F (A, P) (or (H, A, P)) in float64, the channel layout its
peer uses, the attention scale (YaRN / LongRoPE) and its grid's coordinate law. Use it with the core:

    recipe = ndrope.recipes.yarn(128, factor=4.0, original_max_position_embeddings=4096)
    q = ndrope.apply_rotary(q, recipe.rotation(recipe.positions(q.shape[-2])), layout=recipe.layout)
    rope = ndrope.RotaryEmbedding.from_recipe(recipe)  # the same as a module (keeps the scale and coordinate law)

Every recipe is tested against its peer's own code (transformers, timm, rotary-embedding-torch) in
tests/test_recipes_*.py. Only torch is imported here.

Language models (`language`): `standard`, `linear`, `dynamic_ntk`, `yarn`, `llama3`, `longrope`, `p_rope`.
Multimodal (`multimodal`): `mrope`, `qwen_vl_positions`, `qwen_vl_decode_positions`, `video_temporal_bands`.
Vision (`vision`): `timm_axial`, `rope_axial`, `rope_mixed`, `rope_mixed_init`, `dinov3`, `pixtral`,
`rotary_embedding_torch`.
"""

from ._base import Coordinates, GridKind, Indexing, Normalize, RopeRecipe
from .language import dynamic_ntk, linear, llama3, longrope, p_rope, standard, yarn
from .multimodal import (
    QwenVersion,
    TextAdvance,
    mrope,
    qwen_vl_decode_positions,
    qwen_vl_positions,
    video_temporal_bands,
)
from .vision import (
    FreqsFor,
    dinov3,
    pixtral,
    rope_axial,
    rope_mixed,
    rope_mixed_init,
    rotary_embedding_torch,
    timm_axial,
)

__all__ = [
    "Coordinates",
    "FreqsFor",
    "GridKind",
    "Indexing",
    "Normalize",
    "QwenVersion",
    "RopeRecipe",
    "TextAdvance",
    "dinov3",
    "dynamic_ntk",
    "linear",
    "llama3",
    "longrope",
    "mrope",
    "p_rope",
    "pixtral",
    "qwen_vl_decode_positions",
    "qwen_vl_positions",
    "rope_axial",
    "rope_mixed",
    "rope_mixed_init",
    "rotary_embedding_torch",
    "standard",
    "timm_axial",
    "video_temporal_bands",
    "yarn",
]
