"""`patch(model)`: a timm Eva-family model rotates its queries and keys with ``ndrope``, in place, per instance.

    from ndrope.integrations import timm
    timm.patch(model)      # EVA-02, naver RoPE-ViT (vit_*_rope*, RoPE-Mixed), DINOv3, vit_*_rope_reg*_gap

timm's ``Eva`` builds one RoPE table per forward (``model.rope.get_embed``) and hands it to every block, whose
attention (``EvaAttention``, ``AttentionRope``) calls the module-level ``apply_rot_embed_cat``. `patch` replaces
``model.rope`` by `TimmRotaryEmbedding` (timm's interface, an `ndrope.RotaryEmbedding` inside: the recipe of its
``rope_type`` "cat", "mixed" or "dinov3") and gives each attention layer its own forward in which
``apply_rot_embed_cat`` is `ndrope.apply_rotary`; the class and every other instance keep timm's code. Before
changing anything it checks that ndrope rotates a probe as timm's own table and attention do at the model's grid. The state dict keeps timm's
keys and layouts (RoPE-Mixed's learned ``rope.freqs`` is converted on save and load), so timm checkpoints load
into a patched model and back. `mixed_freqs_to_ndrope` / `mixed_freqs_to_timm` convert RoPE-Mixed frequencies
between timm's layout and ndrope's (`vit`'s ``rope_mixed``).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..functional import Layout, apply_rotary
from ..modules import RotaryEmbedding
from ..positions import augment_positions, check_augmentation
from ..recipes import Coordinates, RopeRecipe, dinov3, timm_axial
from ._rebind import calls_any, routed_forward

#: timm's ``Eva(rope_type=...)`` values `patch` reproduces, by the class of ``model.rope``
ROPE_MODULES = {"RotaryEmbeddingCat": "cat", "RotaryEmbeddingMixed": "mixed", "RotaryEmbeddingDinoV3": "dinov3"}
#: attention classes whose ``apply_rot_embed_cat`` call `patch` routes through ndrope
ATTENTION_CLASSES = ("EvaAttention", "AttentionRope")
SUPPORTED = (
    "timm Eva models (EVA-02, vit_*_rope* naver RoPE-ViT incl. RoPE-Mixed, vit_*_rope_reg*_gap, DINOv3) with "
    f"rope_type {sorted(ROPE_MODULES.values())}"
)
#: timm's rotation of a unit probe matches ndrope's at patch time to this (float32, angles up to ~1e2)
SELF_CHECK_TOL = 1e-4
GridIndexing = Literal["ij", "xy"]


# ---------------------------------------------------------------------------------------------------------------
# RoPE-Mixed frequencies: timm's layout <-> ndrope's
# ---------------------------------------------------------------------------------------------------------------


def mixed_freqs_to_ndrope(freqs: Tensor, *, grid_indexing: GridIndexing = "xy") -> Tensor:
    """timm ``RotaryEmbeddingMixed.freqs`` (2, depth, H, P) -> ndrope's (depth * H, 2, P).

    timm's ``freqs[0]`` multiplies its first coordinate (the column for ``grid_indexing="xy"``, the row for
    ``"ij"``); ndrope's F[:, 0] multiplies the row of `ndrope.grid` positions (vit's ``rope_mixed`` layout:
    one (H, 2, P) block per layer). The channel layout (timm: interleaved) is not changed.
    """
    if freqs.dim() != 4 or freqs.shape[0] != 2:
        raise ValueError(f"freqs must be timm's RoPE-Mixed (2, depth, H, P), got shape {tuple(freqs.shape)}")
    first, second = freqs[0], freqs[1]
    row, column = (second, first) if _indexing(grid_indexing) == "xy" else (first, second)
    return torch.stack([row, column], dim=-2).flatten(0, 1)


def mixed_freqs_to_timm(freqs: Tensor, *, depth: int, grid_indexing: GridIndexing = "xy") -> Tensor:
    """ndrope's RoPE-Mixed (depth * H, 2, P) on (row, column) positions -> timm's (2, depth, H, P)."""
    if freqs.dim() != 3 or freqs.shape[1] != 2 or freqs.shape[0] % depth:
        raise ValueError(f"freqs must be (depth * H, 2, P) with depth={depth}, got shape {tuple(freqs.shape)}")
    per_layer = freqs.unflatten(0, (depth, -1))  # (depth, H, 2, P)
    row, column = per_layer[:, :, 0], per_layer[:, :, 1]
    return torch.stack((column, row) if _indexing(grid_indexing) == "xy" else (row, column))


def convert_mixed_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    to: Literal["ndrope", "timm"],
    depth: int,
    grid_indexing: GridIndexing = "xy",
    key: str = "rope.freqs",
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with RoPE-Mixed frequencies ``key`` in the other layout (timm's (2, depth, H, P)
    or ndrope's (depth * H, 2, P)); every other entry is kept."""
    if to not in ("ndrope", "timm"):
        raise ValueError(f"to={to!r} is not supported; choose one of ['ndrope', 'timm']")
    if key not in state_dict:
        raise KeyError(f"{key!r} is not in the state dict; its RoPE keys: {[k for k in state_dict if 'rope' in k]}")
    out = dict(state_dict)
    if to == "ndrope":
        out[key] = mixed_freqs_to_ndrope(state_dict[key], grid_indexing=grid_indexing)
    else:
        out[key] = mixed_freqs_to_timm(state_dict[key], depth=depth, grid_indexing=grid_indexing)
    return out


def _indexing(value: str) -> str:
    if value not in ("ij", "xy"):
        raise ValueError(f"grid_indexing={value!r} is not supported; choose one of ['ij', 'xy']")
    return value


# ---------------------------------------------------------------------------------------------------------------
# timm's rope module -> recipe
# ---------------------------------------------------------------------------------------------------------------


def recipe_of(rope: nn.Module) -> RopeRecipe:
    """The `ndrope.recipes` scheme of a timm ``RotaryEmbeddingCat`` / ``RotaryEmbeddingMixed`` /
    ``RotaryEmbeddingDinoV3`` (its current frequencies, for RoPE-Mixed on (row, column) positions)."""
    kind = ROPE_MODULES.get(type(rope).__name__)
    if kind == "mixed":
        freqs = mixed_freqs_to_ndrope(rope.freqs.detach().double(), grid_indexing=rope.grid_indexing)
        return RopeRecipe(freqs, "interleaved")
    if kind == "dinov3":
        minmax = rope.min_period is not None and rope.max_period is not None
        return dinov3(
            rope.dim,
            theta=None if minmax else rope.temperature,
            min_period=rope.min_period,
            max_period=rope.max_period,
            normalize=rope.normalize_coords,
            grid_offset=float(rope.grid_offset),
            indexing=_indexing(rope.grid_indexing),
            rotate_half=bool(rope.rotate_half),
        )
    if kind == "cat":
        axial = timm_axial(
            rope.dim,
            2,
            theta=float(rope.temperature),
            in_pixels=bool(rope.in_pixels),
            max_res=rope.max_res,
            linear_bands=bool(rope.linear_bands),
            rotate_half=bool(getattr(rope, "rotate_half", False)),
        )
        grid_type = getattr(rope, "grid_type", "pixel" if rope.in_pixels else "index")
        coordinates = Coordinates(
            kind=grid_type,
            reference_shape=None if rope.ref_feat_shape is None else tuple(rope.ref_feat_shape),
            offset=0.0 if grid_type == "pixel" else float(getattr(rope, "grid_offset", 0.0)),
            normalize=getattr(rope, "normalize_coords", "separate"),
            indexing=_indexing(getattr(rope, "grid_indexing", "ij")),
        )
        return RopeRecipe(axial.freqs, axial.layout, 1.0, coordinates)
    raise ValueError(f"timm rope module {type(rope).__name__} is not supported; supported: {sorted(ROPE_MODULES)}")


# ---------------------------------------------------------------------------------------------------------------
# the module: timm's rope interface, ndrope inside
# ---------------------------------------------------------------------------------------------------------------


class TimmRotaryEmbedding(nn.Module):
    """timm's rope interface on an `ndrope.RotaryEmbedding`: ``get_embed(shape=None)`` -> one tensor
    ``cat(cos, sin)`` (N, 2P), per head (H, N, 2P), or with ``depth`` one per block (depth, H, N, 2P), the form
    Eva hands its blocks (it gathers kept tokens on dim -2 and indexes blocks on dim 0). In training mode the
    coordinates are augmented (`ndrope.augment_positions`) by ``shift``, ``jitter``, ``rescale``, as timm's
    ``*_coords`` settings do.

    ``depth`` (RoPE-Mixed): frequencies (depth * H, 2, P) with H = ``num_heads`` hold one (H, 2, P) block per layer;
    any other scheme is repeated for every block. ``timm_state``: save and load the learned frequencies under ``freqs`` in timm's
    (2, depth, H, P) layout with ``grid_indexing`` (a timm checkpoint loads, and the saved one loads into timm).
    """

    def __init__(
        self,
        rope: RotaryEmbedding,
        *,
        feat_shape: list[int] | None = None,
        depth: int | None = None,
        num_heads: int = 1,
        shift: float = 0.0,
        jitter: float = 1.0,
        rescale: float = 1.0,
        timm_state: GridIndexing | None = None,
    ) -> None:
        super().__init__()
        self.rope = rope
        self.feat_shape = None if feat_shape is None else list(feat_shape)
        self.depth = depth
        #: whether the frequencies hold one (H, 2, P) block per layer (RoPE-Mixed: depth * H "heads")
        self.per_layer = depth is not None and rope.freqs.dim() == 3 and rope.freqs.shape[0] == depth * num_heads
        self.shift, self.jitter, self.rescale = check_augmentation(shift, jitter, rescale)
        self.timm_state = timm_state
        if timm_state is not None:
            self.register_state_dict_post_hook(_save_timm_freqs)
            self.register_load_state_dict_pre_hook(_load_timm_freqs)

    def update_feat_shape(self, feat_shape: list[int]) -> None:
        """timm's ``set_input_size`` calls this with the new patch grid."""
        if self.feat_shape is not None:
            self.feat_shape = list(feat_shape)

    def get_embed(self, shape: list[int] | None = None, dtype: torch.dtype | None = None) -> Tensor:
        grid_shape = tuple(shape if shape is not None else self.feat_shape or ())
        if len(grid_shape) != 2:
            raise ValueError(f"get_embed needs a (h, w) grid shape (no feat_shape is set), got shape={shape}")
        positions: Any = grid_shape
        if self.training and (self.shift, self.jitter, self.rescale) != (0.0, 1.0, 1.0):
            positions = augment_positions(
                self.rope.positions(grid_shape), shift=self.shift, jitter=self.jitter, rescale=self.rescale
            )
        cos, sin = self.rope.rotation(positions, dtype=dtype)
        table = torch.cat([cos, sin], dim=-1)  # (N, 2P) or (H', N, 2P)
        if self.depth is not None:
            if self.per_layer:
                table = table.unflatten(0, (self.depth, -1))  # (depth * H, N, 2P) -> (depth, H, N, 2P)
            else:  # one table for every block: (depth, 1, N, 2P) or (depth, H, N, 2P)
                table = table.expand(self.depth, *([1] if table.dim() == 2 else []), *table.shape)
        return table if dtype is None else table.to(dtype)


def _save_timm_freqs(module: TimmRotaryEmbedding, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "rope.freqs"
    if key in state_dict:
        state_dict[prefix + "freqs"] = mixed_freqs_to_timm(
            state_dict.pop(key), depth=module.depth, grid_indexing=module.timm_state
        )


def _load_timm_freqs(module: TimmRotaryEmbedding, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "freqs"
    if key in state_dict:
        state_dict[prefix + "rope.freqs"] = mixed_freqs_to_ndrope(state_dict.pop(key), grid_indexing=module.timm_state)


def rotate_cat(layout: Layout) -> types.FunctionType:
    """timm's ``apply_rot_embed_cat(x, emb, half=False)`` on ndrope: x (B, H, N, D); emb a `TimmRotaryEmbedding`
    table ``cat(cos, sin)`` (..., N, 2P) broadcastable to x. The scheme's own layout applies (``half`` is timm's
    flag for its own tables)."""

    def apply_rot_embed_cat(x: Tensor, emb: Tensor, half: bool = False) -> Tensor:
        cos, sin = emb.chunk(2, dim=-1)
        return apply_rotary(x, (cos, sin), layout=layout)

    return apply_rot_embed_cat


# ---------------------------------------------------------------------------------------------------------------
# patch
# ---------------------------------------------------------------------------------------------------------------


def _self_check(original: nn.Module, new: TimmRotaryEmbedding, attention: nn.Module, grid: tuple[int, int]) -> float:
    """The largest difference between timm's rotation of a probe (its table, its attention's
    ``apply_rot_embed_cat`` and ``rotate_half``) and ndrope's, in eval mode at ``grid``."""
    timm_rotate = type(attention).forward.__globals__["apply_rot_embed_cat"]
    with torch.no_grad():
        was_training = original.training
        theirs = original.eval().get_embed(list(grid)).float()
        original.train(was_training)
        ours = new.eval().get_embed(list(grid))
        probe = torch.randn(*theirs.shape[:-1], theirs.shape[-1] // 2, generator=torch.Generator().manual_seed(0))
        if ours.shape[:-1] != theirs.shape[:-1] or ours.shape[-1] > probe.shape[-1]:
            return math.inf
        expected = timm_rotate(probe.to(theirs.device), theirs, half=bool(getattr(attention, "rotate_half", False)))
        return float((rotate_cat(new.rope.layout)(probe.to(ours.device), ours) - expected).abs().max())


def patch(
    model: nn.Module, recipe: RopeRecipe | RotaryEmbedding | None = None, *, learnable: bool = False
) -> nn.Module:
    """Rotate a timm Eva-family ``model``'s queries and keys with ndrope, in place; returns ``model``.

    Without ``recipe``, ``model.rope`` is replaced by the same scheme in ndrope (timm's "cat" with EVA-02's
    ``ref_feat_shape``, pixel bands, ``xy``; "mixed" with its learned frequencies; "dinov3"), after checking that
    the tables agree. ``recipe`` (an `ndrope.recipes` recipe or an `ndrope.RotaryEmbedding`, 2 axes) puts another
    scheme in; ``learnable=True`` makes a recipe's frequencies parameters. Only this instance changes.
    Raises (leaving the model unchanged) for a model or rope module patch does not know, a scheme that does not
    fit, or a model that is already patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a timm model), got {type(model).__name__}")
    if not isinstance(learnable, bool):
        raise TypeError(f"learnable={learnable!r} must be a bool")
    original = getattr(model, "rope", None)
    if isinstance(original, TimmRotaryEmbedding):
        raise ValueError(f"{type(model).__name__} is already patched by ndrope; patch a fresh model instead")
    if type(model).__name__ != "Eva" or original is None:
        raise ValueError(f"{type(model).__name__} has no RoPE module patch knows. Supported: {SUPPORTED}")
    kind = ROPE_MODULES.get(type(original).__name__)
    if kind is None:
        raise ValueError(f"{type(model).__name__}.rope is a {type(original).__name__}, which patch does not know. "
                         f"Supported: {SUPPORTED}")
    attentions = [(n, m) for n, m in model.named_modules() if type(m).__name__ in ATTENTION_CLASSES]
    strangers = sorted({type(m).__name__ for n, m in model.named_modules()
                        if m is not original and type(m).__name__ not in ATTENTION_CLASSES
                        and calls_any(type(m).forward, {"apply_rot_embed_cat"})})
    if strangers or not attentions:
        raise ValueError(f"{type(model).__name__} has attention layers patch does not know: {strangers}. "
                         f"Supported: {list(ATTENTION_CLASSES)}")
    for _, module in attentions:
        if not calls_any(type(module).forward, {"apply_rot_embed_cat"}):
            raise ValueError(f"{type(module).__name__}.forward does not call apply_rot_embed_cat; this timm release "
                             "is not supported")

    depth = len(model.blocks) if kind == "mixed" else None
    heads = model.blocks[0].attn.num_heads
    head_dim = model.embed_dim // heads
    if recipe is None:
        own = recipe_of(original)
        rope = RotaryEmbedding.from_recipe(own, learnable=kind == "mixed" or learnable)
    else:
        rope = recipe if isinstance(recipe, RotaryEmbedding) else None
        if rope is None and isinstance(recipe, RopeRecipe):
            rope = RotaryEmbedding.from_recipe(recipe, learnable=learnable)
        if rope is None:
            raise TypeError(f"recipe must be an ndrope.recipes.RopeRecipe or ndrope.RotaryEmbedding, "
                            f"got {type(recipe).__name__}")
        _check_given(rope, head_dim, heads, depth, model)
    feat_shape = getattr(original, "feat_shape", None)
    new = TimmRotaryEmbedding(
        rope,
        feat_shape=feat_shape,
        depth=depth,
        num_heads=heads,
        shift=getattr(original, "shift_coords", None) or 0.0,
        jitter=getattr(original, "jitter_coords", None) or 1.0,
        rescale=getattr(original, "rescale_coords", None) or 1.0,
        timm_state=original.grid_indexing if kind == "mixed" and recipe is None else None,
    )
    device = next((t.device for t in original.parameters()), None) or next((t.device for t in original.buffers()), None)
    if device is not None:
        new = new.to(device)
    if next((p.dtype for p in model.parameters() if p.is_floating_point()), None) == torch.float64:
        new = new.double()
    if recipe is None:
        grid = tuple(feat_shape) if feat_shape else (3, 5)
        error = _self_check(original, new, attentions[0][1], grid)
        if not error <= SELF_CHECK_TOL:
            raise ValueError(f"{type(original).__name__}: ndrope's rotation differs from timm's by {error:.2e} at grid "
                             f"{grid}; patch cannot express this timm configuration (its table and its attention's "
                             "rotate_half may disagree)")
    new.train(original.training)
    forwards = {name: routed_forward(m, {"apply_rot_embed_cat": rotate_cat(rope.layout)}) for name, m in attentions}

    # everything is built and checked: now change the model
    model.rope = new
    for name, forward in forwards.items():
        model.get_submodule(name).forward = forward
    return model


def _check_given(rope: RotaryEmbedding, head_dim: int, heads: int, depth: int | None, model: nn.Module) -> None:
    if rope.n_axes != 2:
        raise ValueError(f"recipe: n_axes={rope.n_axes}, but timm's Eva positions patches on 2 axes")
    if rope.pairs > head_dim // 2:
        raise ValueError(f"recipe: rotates {rope.pairs} pairs, but a head has only {head_dim // 2}")
    if rope.freqs.dim() == 3:
        allowed = {heads} | ({heads * depth} if depth else set())
        if rope.freqs.shape[0] not in allowed:
            raise ValueError(f"recipe: frequencies for {rope.freqs.shape[0]} heads; the model has {heads} heads"
                             + (f" and {depth} blocks" if depth else ""))
        if depth is None and getattr(model, "patch_drop", None) is not None:
            raise ValueError("recipe: per-head frequencies in a model with patch dropout need rope_type='mixed' "
                             "(timm gathers a non-mixed table as one shared by the heads)")
