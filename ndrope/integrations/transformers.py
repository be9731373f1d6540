"""`patch(model)`: a transformers model rotates its queries and keys with ``ndrope``, in place, per instance.

    from ndrope.integrations import transformers
    transformers.patch(model)                           # same outputs, rotation by ndrope::rotate
    transformers.patch(model, recipe=recipes.yarn(...))  # or any ndrope scheme in its place

What `patch` does, for one model instance:
  * reads each rotary module's config (``rope_parameters``: rope_type and its fields, ``mrope_section``, layer
    types, vision settings), builds the matching `ndrope.recipes` scheme and replaces the module with one of the
    modules below (same call signature; they return ndrope's (cos, sin) tables (..., N, P) in float32);
  * gives each attention layer its own copy of its class's forward in which the modeling file's
    ``apply_rotary_pos_emb`` (``apply_rotary_pos_emb_vision``) is ndrope's (`ndrope.apply_rotary`, the op
    ``ndrope::rotate``); the class, the modeling module and every other instance keep transformers' code;
  * Qwen-VL: the instance's ``get_rope_index`` is `ndrope.recipes.qwen_vl_positions`.
Everything is validated before anything changes: an unknown model, rope_type or config value raises and leaves
the model as it was. Fixed frequencies add no state-dict entry, so checkpoints load into the patched model and
back. Shape alphabet: B batch, H heads, N tokens, D channels per head, A axes, P rotated pairs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import recipes
from ..functional import Layout, apply_rotary
from ..modules import RotaryEmbedding
from ..positions import augment_positions, check_augmentation
from ..recipes import RopeRecipe
from ._rebind import calls_any, global_names, routed_forward

#: The oldest transformers release `patch` is tested with (5.16 has other vision rotary interfaces, 5.10 another
#: dynamic-NTK update during generation).
MIN_VERSION = (5, 17)
#: transformers' ``rope_type`` values `patch` reproduces (``ROPE_INIT_FUNCTIONS`` plus "default").
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
#: What `patch` accepts as ``recipe``: one scheme, or one per rotary module (by its name in ``named_modules``).
RecipeArg = RopeRecipe | RotaryEmbedding | Mapping[str, RopeRecipe | RotaryEmbedding] | None


# ---------------------------------------------------------------------------------------------------------------
# config -> recipe
# ---------------------------------------------------------------------------------------------------------------


def text_recipe(
    parameters: Mapping[str, Any],
    *,
    head_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> RopeRecipe:
    """The `ndrope.recipes` scheme of one transformers ``rope_parameters`` dict (a language model's 1D RoPE).

    ``seq_len`` is the sequence length the frequencies are for ("dynamic" and "longrope" depend on it; None is
    transformers' initial state). Raises ValueError naming an unknown ``rope_type``.
    """
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported by ndrope.integrations; choose one of {list(ROPE_TYPES)}")
    theta = float(parameters["rope_theta"])
    partial = float(parameters.get("partial_rotary_factor") or 1.0)
    common = dict(theta=theta, partial_rotary_factor=partial)
    if rope_type == "default":
        return recipes.standard(head_dim, **common)
    if rope_type == "linear":
        return recipes.linear(head_dim, factor=parameters["factor"], **common)
    if rope_type == "dynamic":
        return recipes.dynamic_ntk(
            head_dim, factor=parameters["factor"], max_position_embeddings=max_position_embeddings, seq_len=seq_len,
            **common,
        )
    if rope_type == "yarn":
        return recipes.yarn(
            head_dim,
            factor=parameters.get("factor"),
            original_max_position_embeddings=parameters["original_max_position_embeddings"],
            max_position_embeddings=max_position_embeddings,
            attention_factor=parameters.get("attention_factor"),
            beta_fast=parameters.get("beta_fast") or 32.0,
            beta_slow=parameters.get("beta_slow") or 1.0,
            mscale=parameters.get("mscale"),
            mscale_all_dim=parameters.get("mscale_all_dim"),
            truncate=parameters.get("truncate", True),
            **common,
        )
    if rope_type == "longrope":
        return recipes.longrope(
            head_dim,
            short_factor=parameters["short_factor"],
            long_factor=parameters["long_factor"],
            original_max_position_embeddings=parameters["original_max_position_embeddings"],
            max_position_embeddings=max_position_embeddings,
            factor=parameters.get("factor"),
            attention_factor=parameters.get("attention_factor"),
            seq_len=seq_len,
            **common,
        )
    if rope_type == "llama3":
        return recipes.llama3(
            head_dim,
            factor=parameters["factor"],
            low_freq_factor=parameters["low_freq_factor"],
            high_freq_factor=parameters["high_freq_factor"],
            original_max_position_embeddings=parameters["original_max_position_embeddings"],
            theta=theta,
            partial_rotary_factor=partial,
        )
    return recipes.p_rope(head_dim, partial, theta=theta, factor=float(parameters.get("factor") or 1.0))


@dataclasses.dataclass(frozen=True)
class LengthSchedule:
    """How "dynamic" and "longrope" frequencies follow the sequence, as transformers' ``dynamic_rope_update``.

    ``build(seq_len)`` gives the recipe for a length (None: the initial one). "dynamic": recomputed whenever the
    largest position + 1 exceeds the longest seen so far, back to the initial one below ``original_length``
    (``max_position_embeddings``). "longrope": the long factors when it exceeds ``original_length``
    (``original_max_position_embeddings``), the short ones otherwise.
    """

    rope_type: Literal["dynamic", "longrope"]
    build: Callable[[int | None], RopeRecipe]
    original_length: int


# ---------------------------------------------------------------------------------------------------------------
# modules with transformers' rotary signatures, ndrope inside
# ---------------------------------------------------------------------------------------------------------------


class TextRotaryEmbedding(nn.Module):
    """A language model's rotary module on ndrope: ``forward(x, position_ids)`` -> (cos, sin), each (B, N, P).

    ``position_ids`` (B, N) token indices for 1D RoPE, or (3, B, N) (t, h, w) for M-RoPE (a (B, N) or (1, B, N)
    tensor is text: equal on every axis). The tables are float32 (float64 for float64 x) whatever x's dtype:
    `ndrope.apply_rotary` rotates at their precision and rounds once to q's dtype. ``schedule``: frequencies
    that follow the sequence length ("dynamic", "longrope"), as transformers does, rebuilt on this module.
    """

    def __init__(self, rope: RotaryEmbedding, *, schedule: LengthSchedule | None = None) -> None:
        super().__init__()
        if rope.n_axes not in (1, 3):
            raise ValueError(f"a text rotary module needs 1 (tokens) or 3 (t, h, w) axes, got n_axes={rope.n_axes}")
        self.rope = rope
        self.schedule = schedule
        self.longest = None if schedule is None else schedule.original_length  # transformers' max_seq_len_cached
        if schedule is not None and schedule.rope_type == "longrope":
            self.long_rope = RotaryEmbedding.from_recipe(schedule.build(schedule.original_length + 1))

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        rope = self.rope if self.schedule is None else self._follow_length(position_ids)
        if rope.n_axes == 1:
            positions = position_ids[..., None]  # (B, N, 1)
        else:
            if position_ids.dim() == 2:
                position_ids = position_ids[None]
            positions = position_ids.expand(3, -1, -1).permute(1, 2, 0)  # (B, N, 3)
        return rope.rotation(positions, dtype=x.dtype)

    def _follow_length(self, position_ids: Tensor) -> RotaryEmbedding:
        seq_len = int(position_ids.max()) + 1
        original = self.schedule.original_length
        if self.schedule.rope_type == "longrope":
            return self.long_rope if seq_len > original else self.rope
        if seq_len > self.longest:  # growth
            self.rope, self.longest = self._rebuilt(seq_len), seq_len
        elif seq_len < original < self.longest:  # back within the trained length
            self.rope, self.longest = self._rebuilt(None), original
        return self.rope

    def _rebuilt(self, seq_len: int | None) -> RotaryEmbedding:
        rope = RotaryEmbedding.from_recipe(self.schedule.build(seq_len))
        return rope.to(device=self.rope.freqs.device)


class LayerTypeRotaryEmbedding(nn.Module):
    """One `TextRotaryEmbedding` per attention layer type (Gemma3: a theta per type):
    ``forward(x, position_ids, layer_type)`` -> that type's (cos, sin), each (B, N, P)."""

    def __init__(self, by_type: Mapping[str, TextRotaryEmbedding]) -> None:
        super().__init__()
        self.by_type = nn.ModuleDict(dict(by_type))

    def forward(self, x: Tensor, position_ids: Tensor, layer_type: str) -> tuple[Tensor, Tensor]:
        return self.by_type[layer_type](x, position_ids)


class GridRotaryEmbedding(nn.Module):
    """A vision tower's rotary module fed patch indices: ``forward(x, position_ids)`` with position_ids (N, 2)
    integer (row, column) -> (cos, sin), each (N, P), or per head (H, N, P); with ``tokens_first`` per-head
    tables are (N, H * P), tokens first as the tower reorders them (Qwen2.5-VL's windows)."""

    def __init__(self, rope: RotaryEmbedding, *, tokens_first: bool = False) -> None:
        super().__init__()
        self.rope, self.tokens_first = rope, tokens_first

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.rope.rotation(position_ids, dtype=x.dtype)
        if self.tokens_first and cos.dim() == 3:  # (H, N, P) -> (N, H * P)
            cos, sin = (t.transpose(0, 1).flatten(1) for t in (cos, sin))
        return cos, sin


class PatchRotaryEmbedding(nn.Module):
    """DINOv3's rotary module: ``forward(pixel_values)`` (B, C, h, w) -> (cos, sin), each (k + N, P) (or per
    head (H, k + N, P)) for the patch grid, positioned by the recipe's coordinate law; the k prefix tokens
    (class, registers) are not rotated. In training mode the coordinates are augmented (`ndrope.augment_positions`)
    with ``shift``, ``jitter``, ``rescale`` (0, 1, 1: off), as transformers' ``pos_embed_*`` settings do."""

    def __init__(
        self,
        rope: RotaryEmbedding,
        *,
        patch_size: tuple[int, int],
        num_prefix_tokens: int,
        shift: float = 0.0,
        jitter: float = 1.0,
        rescale: float = 1.0,
    ) -> None:
        super().__init__()
        self.rope, self.patch_size, self.num_prefix_tokens = rope, tuple(patch_size), num_prefix_tokens
        self.shift, self.jitter, self.rescale = check_augmentation(shift, jitter, rescale)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        grid_shape = (pixel_values.shape[-2] // self.patch_size[0], pixel_values.shape[-1] // self.patch_size[1])
        positions: Any = grid_shape
        if self.training and (self.shift, self.jitter, self.rescale) != (0.0, 1.0, 1.0):
            positions = augment_positions(
                self.rope.positions(grid_shape), shift=self.shift, jitter=self.jitter, rescale=self.rescale
            )
        return self.rope.rotation(positions, num_prefix_tokens=self.num_prefix_tokens, dtype=pixel_values.dtype)


# ---------------------------------------------------------------------------------------------------------------
# q/k rotation with transformers' call signatures
# ---------------------------------------------------------------------------------------------------------------


def rotate_heads_first(layout: Layout, unsqueeze_dim: int | None) -> Callable[..., tuple[Tensor, Tensor]]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` on ndrope: q, k (B, H, N, D);
    cos, sin ndrope's tables, given a heads axis at ``unsqueeze_dim`` (None: they broadcast as they are)."""

    def apply_rotary_pos_emb(
        q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int | None = unsqueeze_dim, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if unsqueeze_dim is not None:
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return apply_rotary(q, (cos, sin), layout=layout), apply_rotary(k, (cos, sin), layout=layout)

    return apply_rotary_pos_emb


def rotate_tokens_first(layout: Layout, pairs: int) -> Callable[..., tuple[Tensor, Tensor]]:
    """Qwen-VL vision's ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` on ndrope: q, k (N, H, D), tokens first;
    cos, sin (N, P) shared by the heads, or per head (N, H, P) / (N, H * P)."""

    def apply_rotary_pos_emb_vision(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if cos.dim() == 2 and cos.shape[-1] != pairs:  # per-head tables flattened by the tower's reordering
            cos, sin = cos.unflatten(-1, (-1, pairs)), sin.unflatten(-1, (-1, pairs))
        elif cos.dim() == 2:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return apply_rotary(q, (cos, sin), layout=layout), apply_rotary(k, (cos, sin), layout=layout)

    return apply_rotary_pos_emb_vision


# ---------------------------------------------------------------------------------------------------------------
# the models patch knows
# ---------------------------------------------------------------------------------------------------------------

NDROPE_MODULES = (TextRotaryEmbedding, LayerTypeRotaryEmbedding, GridRotaryEmbedding, PatchRotaryEmbedding)


@dataclasses.dataclass(frozen=True)
class RotaryKind:
    """A transformers rotary module class patch replaces: how it is called and what replaces it.

    ``signature`` its forward's parameters (a release that changed them is refused, not mis-patched);
    ``n_axes`` the coordinates per position; ``explicit_positions`` whether the model hands it positions (then a
    recipe's coordinate law cannot apply); ``per_head`` whether per-head frequencies (H, A, P) can work there;
    ``pairs(module)`` the pairs the module rotates, ``max_pairs(module)`` the pairs of a head (D // 2).
    """

    signature: tuple[str, ...]
    n_axes: int
    explicit_positions: bool
    per_head: bool
    build: Callable[[nn.Module, RotaryEmbedding | None, bool], nn.Module]
    pairs: Callable[[nn.Module], int]
    max_pairs: Callable[[nn.Module], int]


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """A transformers attention class patch routes: the global name its forward calls, and its replacement."""

    function: str
    tokens_first: bool
    unsqueeze_dim: int | None = 1


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _text_rope(module: nn.Module, parameters: Mapping[str, Any], learnable: bool,
               mrope: Callable[[RopeRecipe], RopeRecipe] | None = None) -> TextRotaryEmbedding:
    config = module.config
    rope_type = parameters.get("rope_type", "default")

    def build(seq_len: int | None) -> RopeRecipe:
        recipe = text_recipe(parameters, head_dim=_head_dim(config), max_position_embeddings=config.max_position_embeddings,
                             seq_len=seq_len)
        return recipe if mrope is None else mrope(recipe)

    schedule = None
    if rope_type == "dynamic":
        schedule = LengthSchedule("dynamic", build, config.max_position_embeddings)
    elif rope_type == "longrope":
        schedule = LengthSchedule("longrope", build, parameters["original_max_position_embeddings"])
    if schedule is not None and learnable:
        raise ValueError(f"learnable=True cannot apply to rope_type={rope_type!r}: its frequencies follow the length")
    return TextRotaryEmbedding(RotaryEmbedding.from_recipe(build(None), learnable=learnable), schedule=schedule)


def _build_text(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
    if given is not None:
        return TextRotaryEmbedding(given)
    return _text_rope(module, module.config.rope_parameters, learnable)


def _build_mrope(interleaved: bool) -> Callable[[nn.Module, RotaryEmbedding | None, bool], nn.Module]:
    def build(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
        if given is not None:
            return TextRotaryEmbedding(given)
        section = tuple(int(s) for s in module.mrope_section)

        def sectioned(ladder: RopeRecipe) -> RopeRecipe:
            return recipes.mrope(_head_dim(module.config), section, interleaved=interleaved, ladder=ladder)

        return _text_rope(module, module.config.rope_parameters, learnable, mrope=sectioned)

    return build


def _build_layer_types(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
    config = module.config
    types_ = sorted(set(config.layer_types))
    if given is not None:
        return LayerTypeRotaryEmbedding({t: TextRotaryEmbedding(given) for t in types_})
    by_type = {}
    for layer_type in types_:
        parameters = config.rope_parameters.get(layer_type)
        if parameters is None:
            raise ValueError(
                f"{type(module).__name__}: layer type {layer_type!r} has no rope_parameters (transformers' own "
                "module cannot run it either); give it RoPE parameters or patch with recipe="
            )
        by_type[layer_type] = _text_rope(module, parameters, learnable)
    return LayerTypeRotaryEmbedding(by_type)


def _axial_theta(module: nn.Module) -> float:
    parameters = module.config.rope_parameters
    if parameters.get("rope_type", "axial") != "axial":
        raise ValueError(f"{type(module).__name__}: rope_type={parameters['rope_type']!r}; only 'axial' exists there")
    return float(parameters["rope_theta"])


def _build_qwen_vision(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
    if given is None:
        head_dim = 4 * module.inv_freq.numel()  # the module's own ladder: head_dim // 4 frequencies per axis
        recipe = recipes.timm_axial(head_dim, 2, theta=_axial_theta(module), rotate_half=True)
        given = RotaryEmbedding.from_recipe(recipe, learnable=learnable)
    return GridRotaryEmbedding(given, tokens_first=True)


def _build_pixtral(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
    if given is None:
        recipe = recipes.pixtral(_head_dim(module.config), theta=_axial_theta(module))
        given = RotaryEmbedding.from_recipe(recipe, learnable=learnable)
    return GridRotaryEmbedding(given)


def _build_dinov3(module: nn.Module, given: RotaryEmbedding | None, learnable: bool) -> nn.Module:
    config = module.config
    if given is None:
        recipe = recipes.dinov3(config.hidden_size // config.num_attention_heads, theta=float(config.rope_theta))
        given = RotaryEmbedding.from_recipe(recipe, learnable=learnable)
    patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
    return PatchRotaryEmbedding(
        given,
        patch_size=tuple(patch),
        num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0) or 0),
        shift=config.pos_embed_shift or 0.0,
        jitter=config.pos_embed_jitter or 1.0,
        rescale=config.pos_embed_rescale or 1.0,
    )


def _inv_freq_pairs(factor: int) -> Callable[[nn.Module], int]:
    return lambda module: factor * module.inv_freq.numel()


def _layer_type_pairs(module: nn.Module) -> int:
    return max(getattr(module, f"{t}_inv_freq").numel() for t in module.rope_type)


def _half_head(module: nn.Module) -> int:
    return _head_dim(module.config) // 2


_TEXT = RotaryKind(("x", "position_ids"), 1, True, False, _build_text, _inv_freq_pairs(1), _half_head)
#: rotary module classes, as "modeling file.class name"
ROTARY_KINDS: dict[str, RotaryKind] = {
    "modeling_llama.LlamaRotaryEmbedding": _TEXT,
    "modeling_mistral.MistralRotaryEmbedding": _TEXT,
    "modeling_qwen2.Qwen2RotaryEmbedding": _TEXT,
    "modeling_qwen3.Qwen3RotaryEmbedding": _TEXT,
    "modeling_gemma3.Gemma3RotaryEmbedding": RotaryKind(
        ("x", "position_ids", "layer_type"), 1, True, False, _build_layer_types, _layer_type_pairs, _half_head
    ),
    "modeling_qwen2_vl.Qwen2VLRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 3, True, False, _build_mrope(False), _inv_freq_pairs(1), _half_head
    ),
    "modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 3, True, False, _build_mrope(False), _inv_freq_pairs(1), _half_head
    ),
    "modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 3, True, False, _build_mrope(True), _inv_freq_pairs(1), _half_head
    ),
    "modeling_qwen2_vl.Qwen2VLVisionRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 2, True, True, _build_qwen_vision, _inv_freq_pairs(2), _inv_freq_pairs(2)
    ),
    "modeling_qwen2_5_vl.Qwen2_5_VLVisionRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 2, True, True, _build_qwen_vision, _inv_freq_pairs(2), _inv_freq_pairs(2)
    ),
    "modeling_qwen3_vl.Qwen3VLVisionRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 2, True, True, _build_qwen_vision, _inv_freq_pairs(2), _inv_freq_pairs(2)
    ),
    "modeling_pixtral.PixtralVisionRotaryEmbedding": RotaryKind(
        ("x", "position_ids"), 2, True, True, _build_pixtral, _inv_freq_pairs(1), _inv_freq_pairs(1)
    ),
    "modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding": RotaryKind(
        ("pixel_values",), 2, False, True, _build_dinov3, _inv_freq_pairs(2), _inv_freq_pairs(2)
    ),
}
_HEADS_FIRST = AttentionKind("apply_rotary_pos_emb", tokens_first=False)
_TOKENS_FIRST = AttentionKind("apply_rotary_pos_emb_vision", tokens_first=True)
#: attention classes whose q/k rotation patch routes through ndrope
ATTENTION_KINDS: dict[str, AttentionKind] = {
    "modeling_llama.LlamaAttention": _HEADS_FIRST,
    "modeling_mistral.MistralAttention": _HEADS_FIRST,
    "modeling_qwen2.Qwen2Attention": _HEADS_FIRST,
    "modeling_qwen3.Qwen3Attention": _HEADS_FIRST,
    "modeling_gemma3.Gemma3Attention": _HEADS_FIRST,
    "modeling_qwen2_vl.Qwen2VLAttention": _HEADS_FIRST,
    "modeling_qwen2_5_vl.Qwen2_5_VLAttention": _HEADS_FIRST,
    "modeling_qwen3_vl.Qwen3VLTextAttention": _HEADS_FIRST,
    "modeling_pixtral.PixtralAttention": _HEADS_FIRST,
    "modeling_dinov3_vit.DINOv3ViTAttention": AttentionKind("apply_rotary_pos_emb", tokens_first=False, unsqueeze_dim=None),
    "modeling_qwen2_vl.VisionAttention": _TOKENS_FIRST,
    "modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention": _TOKENS_FIRST,
    "modeling_qwen3_vl.Qwen3VLVisionAttention": _TOKENS_FIRST,
}
#: Qwen-VL models whose ``get_rope_index`` `ndrope.recipes.qwen_vl_positions` serves
QWEN_MODELS: dict[str, recipes.QwenVersion] = {
    "modeling_qwen2_vl.Qwen2VLModel": "qwen2_vl",
    "modeling_qwen2_5_vl.Qwen2_5_VLModel": "qwen2_5_vl",
    "modeling_qwen3_vl.Qwen3VLModel": "qwen3_vl",
}
SUPPORTED = (
    "Llama, Mistral, Qwen2, Qwen3 (rope_type " + ", ".join(ROPE_TYPES) + "); Qwen2-VL, Qwen2.5-VL, Qwen3-VL "
    "(text M-RoPE, get_rope_index, vision towers); Gemma3 (a rope per layer type); Pixtral vision; DINOv3 ViT"
)


def _key(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _looks_rotary(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "rotary" in name or "rope" in name or hasattr(module, "inv_freq")


def _rotation_calls(module: nn.Module) -> bool:
    """Whether the module's class forward calls a module-level ``apply_rotary*`` function."""
    return any(n.startswith("apply_rotary") for n in global_names(type(module).forward))


def _given_modules(recipe: RecipeArg, rotary_names: list[str], learnable: bool) -> dict[str, RotaryEmbedding]:
    """The user's schemes as modules, keyed by the rotary module they replace."""
    if recipe is None:
        return {}
    if isinstance(recipe, Mapping):
        unknown = sorted(set(recipe) - set(rotary_names))
        if unknown:
            raise ValueError(f"recipe names {unknown} are not rotary modules of this model; its rotary modules: {rotary_names}")
        chosen = dict(recipe)
    elif len(rotary_names) == 1:
        chosen = {rotary_names[0]: recipe}
    else:
        raise ValueError(
            f"this model has {len(rotary_names)} rotary modules {rotary_names}: give recipe as a dict "
            "{name: recipe} naming the one(s) to replace"
        )
    modules = {}
    for name, value in chosen.items():
        if isinstance(value, RotaryEmbedding):
            modules[name] = value
        elif isinstance(value, RopeRecipe):
            modules[name] = RotaryEmbedding.from_recipe(value, learnable=learnable)
        else:
            raise TypeError(f"recipe[{name!r}] must be an ndrope.recipes.RopeRecipe or ndrope.RotaryEmbedding, "
                            f"got {type(value).__name__}")
    return modules


def _check_given(name: str, module: nn.Module, kind: RotaryKind, rope: RotaryEmbedding, heads: int | None) -> None:
    """A user's scheme must fit where it goes: the axes, the pairs, the heads and the coordinates."""
    where = f"recipe for {name!r} ({type(module).__name__})"
    if rope.n_axes != kind.n_axes:
        raise ValueError(f"{where}: n_axes={rope.n_axes}, but this module's positions have {kind.n_axes} axes")
    if rope.pairs > kind.max_pairs(module):
        raise ValueError(f"{where}: rotates {rope.pairs} pairs, but a head has only {kind.max_pairs(module)}")
    if rope.freqs.dim() == 3:
        if not kind.per_head:
            raise ValueError(f"{where}: per-head frequencies {tuple(rope.freqs.shape)} need q and k with the same "
                             "heads; this module serves grouped key/value heads, use shared (A, P) frequencies")
        if heads is not None and rope.freqs.shape[0] != heads:
            raise ValueError(f"{where}: frequencies for {rope.freqs.shape[0]} heads, the model has {heads}")
    if kind.explicit_positions and rope.coordinates is not None:
        raise ValueError(f"{where}: the model hands this module integer positions, so the coordinate law "
                         f"{rope.coordinates} cannot apply; use a recipe with integer index coordinates")


def _heads(model: nn.Module, prefix: str) -> int | None:
    for name, module in model.named_modules():
        if name.startswith(prefix) and _key(module) in ATTENTION_KINDS:
            return getattr(module, "num_heads", None) or getattr(module.config, "num_attention_heads", None)
    return None


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _nearest(attention: str, rotaries: list[str]) -> str | None:
    """The rotary module serving an attention layer: the one whose parent is the attention's longest prefix."""
    best = None
    for name in rotaries:
        owner = _owner(name)
        if owner == "" or attention == owner or attention.startswith(owner + "."):
            if best is None or len(owner) > len(_owner(best)):
                best = name
    return best


def _qwen_rope_index(version: recipes.QwenVersion, vision_config: Any) -> Callable[..., tuple[Tensor, Tensor]]:
    merge = int(vision_config.spatial_merge_size)
    tokens_per_second = float(getattr(vision_config, "tokens_per_second", 2.0) or 2.0)

    def get_rope_index(
        self: nn.Module,
        input_ids: Tensor,
        mm_token_type_ids: Tensor,
        *,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """transformers' ``get_rope_index``, by `ndrope.recipes.qwen_vl_positions`: position_ids (3, B, N) and
        rope deltas (B, 1)."""
        positions, deltas = recipes.qwen_vl_positions(
            mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            spatial_merge_size=merge,
            version=version,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=tokens_per_second,
        )
        return positions.permute(2, 0, 1).to(device=input_ids.device, dtype=input_ids.dtype), deltas[:, None]

    return get_rope_index


def patch(model: nn.Module, recipe: RecipeArg = None, *, learnable: bool = False) -> nn.Module:
    """Rotate ``model``'s queries and keys with ndrope, in place; returns ``model``.

    Without ``recipe`` each rotary module is replaced by the ndrope scheme its config describes (the outputs stay
    within float32 rounding of transformers' own). ``recipe`` puts another scheme in: an `ndrope.recipes` recipe
    or an `ndrope.RotaryEmbedding` (e.g. ``RotaryEmbedding.mixed`` for learned RoPE-Mixed) when the model has one
    rotary module, or a dict ``{name: scheme}`` keyed by rotary module names (``model.named_modules()``).
    ``learnable=True`` makes the frequencies parameters (kept in float32; a checkpoint without them still loads,
    keeping their initial values).

    Only this instance changes: another instance of the class, and every other model, keep transformers' code.
    Raises (leaving the model unchanged) for a model or rope_type patch does not know, a config value it cannot
    express, a scheme that does not fit, or a model that is already patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(learnable, bool):
        raise TypeError(f"learnable={learnable!r} must be a bool")
    _check_version()
    named = list(model.named_modules())
    if any(isinstance(m, NDROPE_MODULES) for _, m in named):
        raise ValueError(f"{type(model).__name__} is already patched by ndrope; patch a fresh model instead")
    unknown = sorted({type(m).__name__ for _, m in named if _looks_rotary(m) and _key(m) not in ROTARY_KINDS})
    if unknown:
        raise ValueError(f"{type(model).__name__} has rotary modules patch does not know: {unknown}. Supported: {SUPPORTED}")
    rotaries = [(n, m) for n, m in named if _key(m) in ROTARY_KINDS]
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary module patch knows. Supported: {SUPPORTED}")
    attentions = [(n, m) for n, m in named if _key(m) in ATTENTION_KINDS or _rotation_calls(m)]
    strangers = sorted({type(m).__name__ for _, m in attentions if _key(m) not in ATTENTION_KINDS})
    if strangers:
        raise ValueError(f"{type(model).__name__} has attention layers patch does not know: {strangers}. "
                         f"Supported: {SUPPORTED}")

    rotary_names = [n for n, _ in rotaries]
    given = _given_modules(recipe, rotary_names, learnable)
    replacements: dict[str, nn.Module] = {}
    layouts: dict[str, tuple[Layout, int]] = {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in rotaries:
        kind = ROTARY_KINDS[_key(module)]
        found = tuple(inspect.signature(type(module).forward).parameters)[1:]
        if found[: len(kind.signature)] != kind.signature:
            raise ValueError(f"{type(module).__name__}.forward{found} is not the interface patch supports "
                             f"{kind.signature}; this transformers release is not supported")
        if name in given:
            _check_given(name, module, kind, given[name], _heads(model, _owner(name)))
        new = kind.build(module, given.get(name), learnable)
        rope = _first_rope(new)
        if name not in given and rope.pairs != kind.pairs(module):
            raise ValueError(f"{type(module).__name__}: the config gives {kind.pairs(module)} rotated pairs but the "
                             f"recipe built from it has {rope.pairs}; patch cannot express this config")
        device = next((t.device for t in module.buffers()), None)
        new = (new.to(device=device) if device is not None else new).train(module.training)
        replacements[name] = new.double() if dtype == torch.float64 else new
        layouts[name] = (rope.layout, rope.pairs)

    forwards: dict[str, types.MethodType] = {}
    for name, module in attentions:
        serving = _nearest(name, rotary_names)
        if serving is None:
            raise ValueError(f"attention layer {name!r} ({type(module).__name__}) has no rotary module above it")
        kind = ATTENTION_KINDS[_key(module)]
        layout, pairs = layouts[serving]
        rotate = rotate_tokens_first(layout, pairs) if kind.tokens_first else rotate_heads_first(layout, kind.unsqueeze_dim)
        if not calls_any(type(module).forward, {kind.function}):
            raise ValueError(f"{type(module).__name__}.forward does not call {kind.function}; this transformers "
                             "release is not supported")
        forwards[name] = routed_forward(module, {kind.function: rotate})
    rope_index = {
        name: types.MethodType(_qwen_rope_index(QWEN_MODELS[_key(m)], m.config.vision_config), m)
        for name, m in named
        if _key(m) in QWEN_MODELS
    }

    # everything is built and checked: now change the model
    for name, new in replacements.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, keep_unsaved_frequencies(new))
    for name, forward in forwards.items():
        model.get_submodule(name).forward = forward
    for name, method in rope_index.items():
        model.get_submodule(name).get_rope_index = method
    return model


def keep_unsaved_frequencies(module: nn.Module) -> nn.Module:
    """Let a checkpoint saved without ``module``'s learned frequencies (the original model's) load into it: a
    missing ``freqs`` entry keeps the current (initial) values instead of failing a strict load."""
    for rope in module.modules():
        if isinstance(rope, RotaryEmbedding) and rope.learnable:
            rope.register_load_state_dict_pre_hook(_fill_missing_frequencies)
    return module


def _fill_missing_frequencies(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.setdefault(prefix + "freqs", module.freqs.detach().clone())


def _check_version() -> None:
    import transformers  # the caller's model comes from it: already imported

    release = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if release < MIN_VERSION:
        raise RuntimeError(
            f"ndrope.integrations.transformers needs transformers >= {'.'.join(map(str, MIN_VERSION))}, "
            f"found {transformers.__version__}"
        )


def _first_rope(module: nn.Module) -> RotaryEmbedding:
    return next(m for m in module.modules() if isinstance(m, RotaryEmbedding))
