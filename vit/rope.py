"""RoPE for `NDRopeVisionTransformer`, decided when the model is built.

`create_rope` turns the model's RoPE arguments into an `ndrope.RotaryEmbedding` (the frequencies) and a
`RopePlan` (how the blocks use them). Once per forward, `RopePlan.rotations` gives each block its
(cos, sin): one table shared by every block (fixed frequencies, ``rope_axial``), or one per block
(RoPE-Mixed, ``rope_mixed``: learned per layer and head). Which of the two is a field of the plan,
set here, never read off a tensor's rank.

The frequencies come from one of two sources, never both: ``pos_embed``'s own (a ladder with base
``rope_theta``, default `ROPE_THETA`) or a named `ndrope.recipes` vision scheme (``rope_recipe``),
whose frequencies and coordinate law (DINOv3's [-1, 1], timm's pixel bands, ``xy`` order, ...)
apply at every grid.

Shape alphabet: B batch, H heads, L blocks, k prefix tokens (class + registers), N patches,
M kept patches, P rotated pairs, A axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import apply_keep_indices_nlc
from torch import Tensor

import ndrope
from ndrope._checks import check_choice, check_number
from ndrope.functional import Rotation
from ndrope.modules import ResolutionMode
from ndrope.positions import check_augmentation
from ndrope.recipes import Coordinates, RopeRecipe

from .attention import ROPE_LAYOUT

#: ``rope_recipe`` names: `ndrope.recipes` vision schemes, built for the model's (head_dim, ndim).
_RECIPES: dict[str, Callable[[int, int], RopeRecipe]] = {
    "dinov3": lambda head_dim, ndim: ndrope.recipes.dinov3(head_dim),
    "rope_axial": lambda head_dim, ndim: ndrope.recipes.rope_axial(head_dim),
    "timm_axial": lambda head_dim, ndim: ndrope.recipes.timm_axial(head_dim, n_axes=ndim),
    # rotary-embedding-torch gives each axis its own block of `dim` channels
    "rotary_embedding_torch": lambda head_dim, ndim: ndrope.recipes.rotary_embedding_torch(head_dim // ndim, n_axes=ndim),
}
VisionRecipe = Literal[tuple(_RECIPES)]  # type: ignore[valid-type]
#: "axial": fixed frequencies, one table for every block; "mixed": learned, one table per block.
RopeKind = Literal["axial", "mixed"]
#: RoPE frequency base per kind, as Heo et al. (https://arxiv.org/abs/2403.13298) use for ViTs:
#: 100 for RoPE-Axial, 10 for the initialisation of the learned RoPE-Mixed frequencies.
ROPE_THETA: dict[str, float] = {"axial": 100.0, "mixed": 10.0}
#: RoPE coordinates at grids other than the training grid when ``rope_resolution_mode`` is not given.
#: ndrope's own default is "extrapolate" because a bare `ndrope.RotaryEmbedding` need not know a
#: training grid; a vit model always does, and "interpolate" generalised best across resolutions in
#: the README's study (section "Results").
DEFAULT_RESOLUTION_MODE: ResolutionMode = "interpolate"


def keep_tokens(table: Tensor, index: Tensor, *, has_batch: bool = False) -> Tensor:
    """Rows ``index`` (B, M) of ``table`` (..., T, X) (or (B, ..., T, X) with ``has_batch``), per
    sample: (B, ..., M, X). timm's `apply_keep_indices_nlc`, whose first argument only gives B."""
    return apply_keep_indices_nlc(index, table, index, pos_embed_has_batch=has_batch)


@dataclass(frozen=True)
class RopePlan:
    """How the blocks of one model are rotated; fixed at construction.

    Attributes:
        depth: L, the number of blocks.
        per_block: one table per block (RoPE-Mixed: the frequencies hold L * H heads, block ``i``
            uses heads ``i * H .. (i + 1) * H - 1``), else one table shared by all blocks.
        coordinates: a recipe's coordinate law, used at every grid; None positions the grid by the
            model's resolution mode (`ndrope.grid`).
        attention_scale: a recipe's factor on cos and sin.
        shift, jitter, rescale: DINOv3-style augmentation of the coordinates in training
            (`ndrope.augment_positions`); (0, 1, 1) is off.
    """

    depth: int
    per_block: bool
    coordinates: Coordinates | None = None
    attention_scale: float = 1.0
    shift: float = 0.0
    jitter: float = 1.0
    rescale: float = 1.0

    @property
    def augments(self) -> bool:
        """Whether training draws augmented coordinates."""
        return self.shift > 0 or self.jitter > 1 or self.rescale > 1

    def rotations(
        self,
        rope: ndrope.RotaryEmbedding,
        grid_shape: Sequence[int],
        *,
        mode: ResolutionMode | None,
        training: bool,
        num_prefix_tokens: int,
        keep: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Rotation]:
        """The (cos, sin) of every block for a grid.

        Each table is (k + N, P) shared by the heads, or (H, k + N, P); the k prefix rows are the
        identity (class and register tokens are not rotated). With ``keep`` (B, k + M), the token
        indices patch dropout kept (prefix included), tables are (B, 1 or H, k + M, P). ``dtype``: of the
        activations (float64 ones get float64 tables).
        """
        positions: Tensor | tuple[int, ...] = tuple(grid_shape)  # ndrope positions a grid by `mode`
        if self.coordinates is not None:
            positions = self.coordinates(grid_shape, dtype=torch.float32, device=rope.freqs.device)
        if training and self.augments:
            if not isinstance(positions, Tensor):
                positions = rope.positions(grid_shape, mode=mode)
            positions = ndrope.augment_positions(positions, shift=self.shift, jitter=self.jitter, rescale=self.rescale)
        cos, sin = rope.rotation(positions, mode=mode or "extrapolate", num_prefix_tokens=num_prefix_tokens, dtype=dtype)
        if self.attention_scale != 1.0:
            cos, sin = cos * self.attention_scale, sin * self.attention_scale
        if keep is not None:
            cos, sin = keep_tokens(cos, keep), keep_tokens(sin, keep)  # B, [L * H or H,] k + M, P
            if rope.freqs.dim() == 2:  # frequencies shared by the heads: B, 1, k + M, P
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if not self.per_block:
            return [(cos, sin)] * self.depth
        # L * H heads -> L blocks of H: (H, k + N, P) or (B, H, k + M, P) each
        cos, sin = cos.unflatten(-3, (self.depth, -1)), sin.unflatten(-3, (self.depth, -1))
        return list(zip(cos.unbind(-4), sin.unbind(-4)))


def create_rope(
    kind: RopeKind,
    *,
    head_dim: int,
    num_heads: int,
    depth: int,
    grid_size: Sequence[int],
    theta: float | None = None,
    recipe: VisionRecipe | None = None,
    shift: float = 0.0,
    jitter: float = 1.0,
    rescale: float = 1.0,
) -> tuple[ndrope.RotaryEmbedding, RopePlan]:
    """The frequencies and the plan of a model's RoPE.

    Args:
        kind: ``"axial"`` fixed frequencies shared by all blocks, ``"mixed"`` learned frequencies per
            block and head (RoPE-Mixed).
        head_dim: D, channels per head; the rotation uses D // 2 pairs split between the axes.
        num_heads, depth: H and L of the model.
        grid_size: the training grid (patches per axis); A = len(grid_size).
        theta: base of the frequency ladder; default `ROPE_THETA` of the kind. Not with ``recipe``.
        recipe: a `VisionRecipe` name whose frequencies (fixed for "axial", the initial values of
            every block for "mixed") and coordinate law replace theta and the resolution mode.
        shift, jitter, rescale: training-time coordinate augmentation (`RopePlan`).
    """
    ndim = len(grid_size)
    if head_dim % 2 or head_dim // 2 < ndim:
        raise ValueError(
            f"RoPE rotates channel pairs of each head, split between ndim={ndim} axes: "
            f"head_dim = embed_dim // num_heads = {head_dim} must be even and at least {2 * ndim}"
        )
    shift, jitter, rescale = check_augmentation(
        shift, jitter, rescale, names=("rope_shift", "rope_jitter", "rope_rescale")
    )
    augmentation = dict(shift=shift, jitter=jitter, rescale=rescale)
    if recipe is None:
        theta = ROPE_THETA[kind] if theta is None else check_number("rope_theta", theta)
        if kind == "axial":
            rope = ndrope.RotaryEmbedding(head_dim, ndim, theta=theta, layout=ROPE_LAYOUT, reference_shape=grid_size)
        else:  # one module with L * H "heads" yields every block's table from one matmul per forward
            rope = ndrope.RotaryEmbedding.mixed(
                head_dim, ndim, depth * num_heads, theta=theta, layout=ROPE_LAYOUT, reference_shape=grid_size
            )
        return rope, RopePlan(depth, per_block=kind == "mixed", **augmentation)
    if theta is not None:
        raise ValueError(
            f"rope_theta={theta!r} and rope_recipe={recipe!r} both set the frequencies; give one of them"
        )
    if not isinstance(recipe, str):
        raise TypeError(f"rope_recipe takes a name, one of {list(_RECIPES)}; got a {type(recipe).__name__}")
    built = _RECIPES[check_choice("rope_recipe", recipe, VisionRecipe)](head_dim, ndim)
    freqs = built.freqs
    if freqs.shape[-2] != ndim or freqs.shape[-1] > head_dim // 2 or freqs.shape[:-2] not in ((), (num_heads,)):
        raise ValueError(
            f"rope_recipe={recipe!r} has frequencies {tuple(freqs.shape)} that do not fit this model: expected "
            f"(A, P) or (H, A, P) with A = ndim = {ndim}, H = num_heads = {num_heads}, P <= head_dim // 2 = {head_dim // 2}"
        )
    if kind == "mixed":  # one learned copy per block, initialised with the recipe's values
        freqs = freqs.expand(num_heads, *freqs.shape[-2:]).repeat(depth, 1, 1).float()
    rope = ndrope.RotaryEmbedding.from_frequencies(freqs, learnable=kind == "mixed", layout=ROPE_LAYOUT)
    plan = RopePlan(depth, kind == "mixed", built.coordinates, built.attention_scale, **augmentation)
    return rope, plan

