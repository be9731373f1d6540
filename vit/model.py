"""`NDRopeVisionTransformer`: timm's ViT with one switch for the position encoding, at any input size.

The subclass changes only where positions enter. Per forward it reads the patch grid from the
patch embedding (``dynamic_img_size``), then
  * adds an absolute table to the patch tokens (``_pos_embed``: learned, sincos, integer, binary),
  * computes the RoPE tables (cos, sin) and the ALiBi bias once for that grid (`rotary_tables`,
    `attention_bias`), and hands them to every block, as timm's Eva does. Attention layers only
    apply what they are given.
Blocks, MLPs, heads, pooling, init and checkpoints are timm's, so every `VisionTransformer` keyword
works and a plain timm ViT state dict loads into ``pos_embed="learned"``.

Shape alphabet: B batch, H heads, N tokens, D channels per head, P = D // 2 pairs, L layers,
k prefix tokens (class + registers); spatial sizes are ``img_size`` / ``grid_shape`` tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from timm.layers import Mlp, PatchDropout, PatchDropoutWithIndices, PatchEmbed
from timm.models import VisionTransformer
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor, nn

import ndrope
from ndrope._checks import check_choice, check_int, check_number, choices
from ndrope.functional import Rotation
from ndrope.modules import ResolutionMode
from ndrope.positions import check_augmentation
from ndrope.recipes import Coordinates, RopeRecipe

from .attention import ROPE_LAYOUT, RopeAttention, RopeBlock
from .patch_embed import PatchEmbedND
from .pos_embed import BINARY_BITS, AlibiBias, FixedPosEmbed, IntegerNorm, resample_pos_embed

PosEmbed = Literal[
    "learned",
    "sincos",
    "rope_axial",
    "rope_mixed",
    "rope_axial+learned",
    "rope_mixed+learned",
    "alibi",
    "integer",
    "binary",
    "none",
]


class _Encoding(NamedTuple):
    absolute: str | None  # "learned", "sincos", "integer", "binary": a table added to the patch tokens
    rope: str | None  # "axial", "mixed": kind of ndrope.RotaryEmbedding
    alibi: bool  # a distance bias on the attention logits


_ENCODINGS: dict[str, _Encoding] = {
    "learned": _Encoding("learned", None, False),
    "sincos": _Encoding("sincos", None, False),
    "rope_axial": _Encoding(None, "axial", False),
    "rope_mixed": _Encoding(None, "mixed", False),
    "rope_axial+learned": _Encoding("learned", "axial", False),
    "rope_mixed+learned": _Encoding("learned", "mixed", False),
    "alibi": _Encoding(None, None, True),
    "integer": _Encoding("integer", None, False),
    "binary": _Encoding("binary", None, False),
    "none": _Encoding(None, None, False),
}
#: Every accepted ``pos_embed`` value.
POS_EMBED_CHOICES: tuple[str, ...] = choices(PosEmbed)
assert set(POS_EMBED_CHOICES) == set(_ENCODINGS), "every pos_embed choice needs an encoding"
#: `ndrope.recipes` vision schemes that ``rope_recipe`` takes by name (built for the model's head_dim)
VisionRecipe = Literal["dinov3", "rope_axial", "timm_axial", "rotary_embedding_torch"]
_RECIPE_BUILDERS: dict[str, Callable[[int, int], RopeRecipe]] = {  # (head_dim, ndim) -> recipe
    "dinov3": lambda head_dim, ndim: ndrope.recipes.dinov3(head_dim),
    "rope_axial": lambda head_dim, ndim: ndrope.recipes.rope_axial(head_dim),
    "timm_axial": lambda head_dim, ndim: ndrope.recipes.timm_axial(head_dim, n_axes=ndim),
    # rotary-embedding-torch gives each axis its own block of `dim` channels
    "rotary_embedding_torch": lambda head_dim, ndim: ndrope.recipes.rotary_embedding_torch(head_dim // ndim, n_axes=ndim),
}
assert set(_RECIPE_BUILDERS) == set(choices(VisionRecipe)), "every named recipe needs a builder"
#: timm's pooling choices (``global_pool``) and weight initialisations (``weight_init``).
GlobalPool = Literal["", "avg", "avgmax", "max", "token", "map"]
WeightInit = Literal["skip", "reset", "jax", "jax_nlhb", "moco", ""]
#: ``pos_embed`` of the registered timm models when none is given.
DEFAULT_POS_EMBED: PosEmbed = "rope_mixed"
#: RoPE coordinates at a grid other than the training grid, unless ``rope_resolution_mode`` is given:
#: "extrapolate" (integer patch indices), "interpolate" (rescaled onto the training grid) or "ntk".
#: "interpolate" measured best in both test protocols of the README's study (Fashion-MNIST, trained at
#: 28px, 3 seeds): zoomed to 44px, rope_axial scores 71.2 % interpolated against 30.3 % extrapolated.
DEFAULT_RESOLUTION_MODE: ResolutionMode = "interpolate"
#: RoPE frequency base per kind, as Heo et al. (https://arxiv.org/abs/2403.13298) use for ViTs:
#: 100 for RoPE-Axial, 10 for the initialisation of the learned RoPE-Mixed frequencies.
ROPE_THETA: dict[str, float] = {"axial": 100.0, "mixed": 10.0}


def _per_axis(name: str, value: Any, ndim: int) -> tuple[int, ...]:
    """An int (used for every axis) or one positive int per axis, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name}={value!r} must be an int or a tuple of ints, one per axis (ndim={ndim})")
    if len(value) != ndim or min(value) < 1:
        raise ValueError(f"{name}={tuple(value)} must have ndim={ndim} positive entries, one per axis")
    return tuple(value)


def _gather_tokens(table: Tensor, index: Tensor, dim: int) -> Tensor:
    """Per-sample entries of ``table`` (B, ...) along its token axis ``dim`` at index (B, M)."""
    shape = [index.shape[0] if d == 0 else index.shape[1] if d == dim else 1 for d in range(table.dim())]
    sizes = [index.shape[1] if d == dim else size for d, size in enumerate(table.shape)]
    return table.gather(dim, index.view(shape).expand(sizes))


class NDRopeVisionTransformer(VisionTransformer):
    """Vision Transformer over 1D-4D inputs with a selectable position encoding.

    >>> model = NDRopeVisionTransformer("rope_mixed", img_size=32, patch_size=4, embed_dim=192,
    ...                                 depth=6, num_heads=3, num_classes=10)
    >>> model(torch.randn(8, 3, 32, 32)).shape, model(torch.randn(8, 3, 48, 48)).shape
    (torch.Size([8, 10]), torch.Size([8, 10]))

    Input (B, C, *spatial) with ``len(spatial) == ndim``; every spatial size must be a multiple of
    the patch size (or set ``dynamic_img_pad=True`` to zero-pad). Any grid works, not only the
    training one: RoPE, ALiBi and the fixed tables are computed for the actual grid, a learned table
    is interpolated (as timm does with ``dynamic_img_size``).

    Args:
        pos_embed: one of `POS_EMBED_CHOICES`:
            ``"learned"`` timm's learned absolute table; ``"sincos"`` fixed sinusoids per axis;
            ``"rope_axial"`` axis-separated RoPE with fixed frequencies (theta `ROPE_THETA`),
            shared by all layers and heads; ``"rope_mixed"`` RoPE-Mixed (Heo et al.), learned
            frequencies per head *and* per layer; ``"rope_*+learned"`` both RoPE and the learned
            table; ``"alibi"`` per-head bias ``-2^(-8h/H) * distance`` on the logits;
            ``"integer"`` / ``"binary"`` the flattened patch index as a number / as bits;
            ``"none"`` no position information (permutation-equivariant over patches).
        ndim: A, number of spatial axes: 2 images (B, C, h, w), 3 video (B, C, t, h, w),
            4 volumes over time (B, C, t, d, h, w), 1 sequences (B, C, n).
        img_size, patch_size: training input size and patch size, an int or one entry per axis.
        embed_dim, depth, num_heads: width C, number of blocks L, heads H (D = C / H).
        rope_theta: RoPE frequency base; default `ROPE_THETA` of the kind.
        rope_resolution_mode: RoPE coordinates at other grids, see `set_resolution_mode`;
            default `DEFAULT_RESOLUTION_MODE`.
        rope_shift, rope_jitter, rope_rescale: DINOv3-style augmentation of the RoPE coordinates in
            training mode (`ndrope.augment_positions`: shift in coordinate units, per-axis jitter factor,
            shared rescale factor); off by default (0, 1, 1).
        rope_recipe: a `ndrope.recipes` vision scheme: its name (`VisionRecipe`, e.g. ``"dinov3"``, built
            for the head_dim), a `RopeRecipe`, or a function of head_dim returning one: its frequencies and its coordinate law (DINOv3's [-1, 1],
            timm's pixel bands, ``xy`` order, ...) replace ``rope_theta`` and the resolution mode, at
            every grid. Fixed with ``rope_axial``, learned per layer from its values with ``rope_mixed``.
            The channel layout stays `ROPE_LAYOUT` (a fixed permutation: irrelevant when training).
            By name, ``timm_axial`` and ``rotary_embedding_torch`` get one axis per ``ndim``.
        integer_norm, binary_bits: options of ``"integer"`` / ``"binary"``, see `FixedPosEmbed`.
        in_chans, num_classes, global_pool, mlp_ratio, qkv_bias, qk_norm, proj_bias, init_values,
        class_token, no_embed_class, reg_tokens, pre_norm, final_norm, fc_norm, dynamic_img_pad,
        drop_rate, pos_drop_rate, patch_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate,
        weight_init, norm_layer, act_layer, mlp_layer: as in `timm.models.VisionTransformer`.
        embed_layer: default timm's `PatchEmbed` in 2D (checkpoint compatible), `PatchEmbedND` otherwise.
        block_fn, attn_layer: `RopeBlock` / `RopeAttention` or subclasses (they take the per-forward
            position tables). ``dynamic_img_size`` is always on.

    Options that belong to an encoding the model does not use (``rope_theta`` without RoPE, ...)
    are ignored, so one config can sweep ``pos_embed``.
    """

    def __init__(
        self,
        pos_embed: PosEmbed = DEFAULT_POS_EMBED,
        *,
        ndim: int = 2,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: GlobalPool = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: WeightInit = "",
        rope_theta: float | None = None,
        rope_resolution_mode: ResolutionMode | None = None,
        rope_shift: float = 0.0,
        rope_jitter: float = 1.0,
        rope_rescale: float = 1.0,
        rope_recipe: VisionRecipe | RopeRecipe | Callable[[int], Any] | None = None,
        integer_norm: IntegerNorm = "train",
        binary_bits: int = BINARY_BITS,
        embed_layer: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        block_fn: type[RopeBlock] = RopeBlock,
        attn_layer: type[RopeAttention] = RopeAttention,
        mlp_layer: type[nn.Module] = Mlp,
    ) -> None:
        check_choice("pos_embed", pos_embed, PosEmbed)
        if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
            raise ValueError(f"ndim={ndim!r} must be a positive int (2 images, 3 video, 4 volumes over time)")
        check_choice("global_pool", global_pool, GlobalPool)
        img_size, patch_size = _per_axis("img_size", img_size, ndim), _per_axis("patch_size", patch_size, ndim)
        if any(size % patch for size, patch in zip(img_size, patch_size)):
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size} on every axis")
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        encoding = _ENCODINGS[pos_embed]
        head_dim = embed_dim // num_heads
        if encoding.rope and (head_dim % 2 or head_dim // 2 < ndim):
            raise ValueError(
                f"pos_embed={pos_embed!r} rotates channel pairs of each head, split between ndim={ndim} axes: "
                f"head_dim = embed_dim // num_heads = {head_dim} must be even and at least {2 * ndim}"
            )
        mode = DEFAULT_RESOLUTION_MODE if rope_resolution_mode is None else rope_resolution_mode
        check_choice("rope_resolution_mode", mode, ResolutionMode)
        check_choice("weight_init", weight_init, WeightInit)
        shift, jitter, rescale = check_augmentation(
            rope_shift, rope_jitter, rope_rescale, names=("rope_shift", "rope_jitter", "rope_rescale")
        )
        if rope_theta is not None:
            check_number("rope_theta", rope_theta)
        check_int("reg_tokens", reg_tokens, minimum=0)
        check_number("patch_drop_rate", patch_drop_rate, minimum=0.0, inclusive=True)
        if patch_drop_rate >= 1.0:
            raise ValueError(f"patch_drop_rate={patch_drop_rate!r} must be in [0, 1): it is the fraction of patches dropped")
        for name, rate in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if check_number(name, rate, minimum=0.0, inclusive=True) > 1.0:
                raise ValueError(f"{name}={rate!r} must be a probability in [0, 1]")
        for name, layer, base in (("attn_layer", attn_layer, RopeAttention), ("block_fn", block_fn, RopeBlock)):
            if not (isinstance(layer, type) and issubclass(layer, base)):
                raise ValueError(
                    f"{name}={layer!r} is not supported: it must be {base.__name__} or a subclass, "
                    "which take the per-forward position tables"
                )
        if embed_layer is None:
            embed_layer = PatchEmbed if ndim == 2 else PatchEmbedND
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            proj_bias=proj_bias,
            init_values=init_values,
            class_token=class_token,
            pos_embed="learn" if encoding.absolute == "learned" else "none",
            no_embed_class=no_embed_class,
            reg_tokens=reg_tokens,
            pre_norm=pre_norm,
            final_norm=final_norm,
            fc_norm=fc_norm,
            dynamic_img_size=True,  # every model runs at any multiple of the patch size
            dynamic_img_pad=dynamic_img_pad,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            patch_drop_rate=patch_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            weight_init=weight_init,
            embed_layer=embed_layer,
            norm_layer=norm_layer,
            act_layer=act_layer,
            block_fn=block_fn,
            mlp_layer=mlp_layer,
            attn_layer=attn_layer,
        )
        self.pos_embed_type, self.ndim, self.num_heads = pos_embed, ndim, num_heads
        grid_size = tuple(self.patch_embed.grid_size)
        fixed = encoding.absolute in ("sincos", "integer", "binary")
        self.fixed_pos_embed = (
            FixedPosEmbed(encoding.absolute, embed_dim, grid_size, integer_norm=integer_norm, binary_bits=binary_bits)
            if fixed
            else None
        )
        self.rope = None
        #: a recipe's coordinate law (and attention scale) for the RoPE positions, or None for `ndrope.grid`
        self.rope_coordinates: Coordinates | None = None
        self.rope_attention_scale = 1.0
        theta = ROPE_THETA[encoding.rope] if encoding.rope and rope_theta is None else rope_theta
        if rope_recipe is not None:
            self.rope = self._rope_from_recipe(rope_recipe, pos_embed, encoding.rope, head_dim, grid_size, depth)
        elif encoding.rope == "axial":
            self.rope = ndrope.RotaryEmbedding(head_dim, ndim, theta=theta, layout=ROPE_LAYOUT, reference_shape=grid_size)
        elif encoding.rope == "mixed":
            # RoPE-Mixed learns one frequency matrix per (layer, head): one module with L * H "heads"
            # yields every layer's table from one matmul per forward.
            self.rope = ndrope.RotaryEmbedding.mixed(
                head_dim, ndim, depth * num_heads, theta=theta, layout=ROPE_LAYOUT, reference_shape=grid_size
            )
        #: DINOv3-style coordinate augmentation of the RoPE positions in training (`ndrope.augment_positions`)
        self.rope_shift, self.rope_jitter, self.rope_rescale = shift, jitter, rescale
        self.alibi = AlibiBias(num_heads) if encoding.alibi else None
        if isinstance(self.patch_drop, PatchDropout):
            # the kept indices select the matching rows of the RoPE tables and ALiBi bias
            self.patch_drop = PatchDropoutWithIndices(self.patch_drop.prob, num_prefix_tokens=self.num_prefix_tokens)
        self.set_resolution_mode(mode)

    def _rope_from_recipe(
        self,
        rope_recipe: RopeRecipe | Callable[[int], RopeRecipe],
        pos_embed: str,
        kind: str | None,
        head_dim: int,
        grid_size: tuple[int, ...],
        depth: int,
    ) -> ndrope.RotaryEmbedding:
        """RoPE with a `ndrope.recipes` scheme's frequencies and coordinate law (fixed for ``rope_axial``,
        learned per layer from the recipe's values for ``rope_mixed``)."""
        if isinstance(rope_recipe, str):
            recipe = _RECIPE_BUILDERS[check_choice("rope_recipe", rope_recipe, VisionRecipe)](head_dim, len(grid_size))
        else:
            recipe = rope_recipe if isinstance(rope_recipe, RopeRecipe) else rope_recipe(head_dim)
        if not isinstance(recipe, RopeRecipe):
            raise TypeError(f"rope_recipe must be an ndrope.recipes.RopeRecipe or a function of head_dim returning one, got {recipe!r}")
        if kind is None:
            raise ValueError(f"rope_recipe needs a RoPE pos_embed (rope_axial, rope_mixed, ...), got pos_embed={pos_embed!r}")
        freqs, n_axes = recipe.freqs, len(grid_size)
        heads = () if freqs.dim() == 2 else (freqs.shape[0],)
        if freqs.shape[-2] != n_axes or freqs.shape[-1] > head_dim // 2 or heads not in ((), (self.num_heads,)):
            raise ValueError(
                f"rope_recipe's frequencies {tuple(freqs.shape)} do not fit this model: expected (A, P) or "
                f"(H, A, P) with A = ndim = {n_axes}, H = num_heads = {self.num_heads}, P <= head_dim // 2 = {head_dim // 2}"
            )
        self.rope_coordinates, self.rope_attention_scale = recipe.coordinates, recipe.attention_scale
        if kind == "mixed":  # one learned copy per layer, initialised with the recipe's values
            per_head = freqs.expand(self.num_heads, *freqs.shape[-2:])
            freqs = per_head.repeat(depth, 1, 1)
        return ndrope.RotaryEmbedding.from_frequencies(
            freqs.float() if kind == "mixed" else freqs, learnable=kind == "mixed", layout=ROPE_LAYOUT
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's set plus the learned RoPE-Mixed frequencies (Heo et al. exclude them too)."""
        return super().no_weight_decay() | {"rope.freqs"}

    def set_resolution_mode(self, mode: ResolutionMode) -> None:
        """Choose the RoPE coordinates for grids other than the training grid (inference-time switch).

        ``"extrapolate"``: integer patch indices, a larger grid reaches new positions;
        ``"interpolate"``: positions rescaled onto the training grid's range (EVA-02, FlexiViT style);
        ``"ntk"``: integer indices with NTK-aware frequency scaling. The training grid itself is
        unaffected. Models without RoPE have no coordinate convention to choose; for them only the
        value is checked and recorded.
        """
        self.rope_resolution_mode = check_choice("mode", mode, ResolutionMode)

    @property
    def augments_positions(self) -> bool:
        """Whether this forward draws RoPE coordinate augmentation (training mode with it configured)."""
        return self.training and (self.rope_shift > 0 or self.rope_jitter > 1 or self.rope_rescale > 1)

    def rotary_tables(self, grid_shape: Sequence[int]) -> list[Rotation | None]:
        """The (cos, sin) pair each block rotates q and k by, for a grid; ``None`` entries without RoPE.

        Axial: one (k + N, P) pair shared by all layers and heads (cached per grid by ndrope when the
        frequencies are fixed). Mixed: one (H, k + N, P) pair per layer, all computed together. The k
        prefix rows are angle 0 (cos 1, sin 0): class and register tokens are not rotated.
        """
        if self.rope is None:
            return [None] * len(self.blocks)
        grid_shape = tuple(grid_shape)
        positions: Any = grid_shape
        if self.rope_coordinates is not None:  # a recipe's coordinates, at every grid
            positions = self.rope_coordinates(grid_shape, dtype=torch.float32, device=self.rope.freqs.device)
        if self.augments_positions:
            if not isinstance(positions, Tensor):
                positions = self.rope.positions(grid_shape, mode=self.rope_resolution_mode)
            positions = ndrope.augment_positions(
                positions, shift=self.rope_shift, jitter=self.rope_jitter, rescale=self.rope_rescale
            )
        cos, sin = self.rope.rotation(
            positions,
            mode=self.rope_resolution_mode,
            num_prefix_tokens=self.num_prefix_tokens,
            dtype=self.patch_embed.proj.weight.dtype,  # float64 tables for a float64 model
        )
        if self.rope_attention_scale != 1.0:
            cos, sin = cos * self.rope_attention_scale, sin * self.rope_attention_scale
        if cos.dim() == 3 and cos.shape[0] == self.num_heads and len(self.blocks) > 1 and not self.rope.learnable:
            return [(cos, sin)] * len(self.blocks)  # fixed per-head frequencies, shared by the layers
        if cos.dim() == 2:  # axial: one table for every layer and head
            return [(cos, sin)] * len(self.blocks)
        per_layer = (cos.unflatten(0, (-1, self.num_heads)), sin.unflatten(0, (-1, self.num_heads)))  # (L, H, k+N, P)
        return list(zip(per_layer[0].unbind(0), per_layer[1].unbind(0)))

    def attention_bias(self, grid_shape: Sequence[int]) -> Tensor | None:
        """The additive logit bias (H, k + N, k + N) shared by all blocks (ALiBi), or ``None``."""
        if self.alibi is None:
            return None
        return self.alibi(tuple(grid_shape), num_prefix_tokens=self.num_prefix_tokens)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, C, *spatial), got {type(x).__name__}")
        if x.dim() != self.ndim + 2:
            raise ValueError(
                f"x has shape {tuple(x.shape)} (rank {x.dim()}) but this model has ndim={self.ndim} spatial axes: "
                f"expected rank {self.ndim + 2}, (B, C, *spatial)"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but in_chans={self.in_chans}")
        if x.shape[0] == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: a batch of 0 samples; pass at least one")
        spatial, patch = tuple(x.shape[2:]), tuple(self.patch_embed.patch_size)
        if min(spatial) == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: spatial size {spatial} has an empty axis")
        weight = self.patch_embed.proj.weight
        if not x.is_floating_point():
            raise TypeError(
                f"x has dtype {x.dtype}; the model takes floating-point images (e.g. x.float() / 255 for uint8 pixels)"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the model's weights are {weight.dtype}: cast one to the other "
                f"(x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast"
            )
        if not self.patch_embed.dynamic_img_pad and any(size % p for size, p in zip(spatial, patch)):
            nearest = tuple(max(p, size // p * p) for size, p in zip(spatial, patch))
            raise ValueError(
                f"input size {spatial} is not a multiple of patch_size={patch}: use e.g. {nearest}, "
                f"or build the model with dynamic_img_pad=True to zero-pad"
            )

    def _check_attn_mask(self, attn_mask: Tensor, batch: int, tokens: int) -> None:
        expected = (batch, self.num_heads, tokens, tokens)
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor broadcastable to (B, H, k + N, k + N) = {expected}")
        if attn_mask.device != self.patch_embed.proj.weight.device:
            raise ValueError(
                f"attn_mask is on {attn_mask.device} but the model is on {self.patch_embed.proj.weight.device}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; use bool (True = may attend) or an additive float bias")
        try:
            fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, expected) == expected
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)} but must broadcast to (B, H, k + N, k + N) = {expected} "
                f"({self.num_prefix_tokens} prefix tokens + the patches of this input)"
            )

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Patch tokens (B, *grid_shape, C) -> (B, k + N, C): absolute table added, prefix tokens prepended."""
        B, *grid_shape, C = x.shape
        x = x.reshape(B, -1, C)
        prefix = [token.expand(B, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        table, covers_prefix = None, False
        if self.pos_embed is not None:
            # timm's layouts: rows for the prefix tokens too (original ViT), or patches only (no_embed_class)
            covers_prefix = not self.no_embed_class
            table = resample_pos_embed(
                self.pos_embed,
                grid_shape,
                self.patch_embed.grid_size,
                num_prefix_tokens=self.num_prefix_tokens if covers_prefix else 0,
            )
        elif self.fixed_pos_embed is not None:
            table = self.fixed_pos_embed(grid_shape, device=x.device).to(x.dtype)  # N, C
        if table is not None and not covers_prefix:
            x = x + table
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if table is not None and covers_prefix:
            x = x + table
        return self.pos_drop(x)

    def _tokens(
        self, x: Tensor, attn_mask: Tensor | None
    ) -> tuple[Tensor, tuple[int, ...], list[Rotation | None], Tensor | None]:
        """Input (B, C, *spatial) -> tokens (B, k + N, C), grid_shape, per-block rotations, logit bias."""
        self._check_input(x)
        x = self.patch_embed(x)  # B, *grid_shape, C
        grid_shape = tuple(x.shape[1:-1])
        x = self._pos_embed(x)
        ropes, bias = self.rotary_tables(grid_shape), self.attention_bias(grid_shape)
        if attn_mask is not None:
            self._check_attn_mask(attn_mask, x.shape[0], x.shape[1])
            if attn_mask.dtype == torch.bool:  # SDPA convention: True = may attend
                attn_mask = torch.zeros(attn_mask.shape, device=x.device).masked_fill(~attn_mask, float("-inf"))
            bias = attn_mask if bias is None else bias + attn_mask
        if isinstance(self.patch_drop, PatchDropoutWithIndices):
            n_tokens = x.shape[1]
            x, keep = self.patch_drop(x)
            if keep is not None:
                ropes, bias = self._keep_positions(keep, ropes, bias, n_tokens=n_tokens)
        return self.norm_pre(x), grid_shape, ropes, bias

    def _keep_positions(
        self, keep: Tensor, ropes: list[Rotation | None], bias: Tensor | None, *, n_tokens: int
    ) -> tuple[list[Rotation | None], Tensor | None]:
        """Restrict the tables for all ``n_tokens`` tokens to those patch dropout kept: keep (B, M) patch indices."""
        B, k = keep.shape[0], self.num_prefix_tokens
        index = torch.cat((torch.arange(k, device=keep.device).expand(B, k), keep + k), dim=1)  # B, k + M
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
            bias = bias.expand(B, -1, n_tokens, n_tokens)  # B, H or 1, k + N, k + N
            bias = _gather_tokens(_gather_tokens(bias, index, 2), index, 3)  # B, H or 1, k + M, k + M
        kept = []
        for rope in ropes:
            if rope is not None:
                # (N, P) or (H, N, P) -> B, H or 1, k + M, P
                rope = tuple(
                    _gather_tokens(t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(B, -1, -1, -1), index, 2)
                    for t in rope
                )
            kept.append(rope)
        return kept, bias

    def _run_block(self, block: nn.Module, x: Tensor, rope: Rotation | None, bias: Tensor | None) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope=rope, attn_mask=bias)
        return block(x, rope=rope, attn_mask=bias)

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, C, *spatial) -> normalised tokens (B, k + N, C).

        ``attn_mask``: optional mask broadcastable to (B, H, k + N, k + N), boolean (True = may
        attend, as in SDPA) or additive float; combined with the model's own bias.
        """
        x, _, ropes, bias = self._tokens(x, attn_mask)
        for block, rope in zip(self.blocks, ropes):
            x = self._run_block(block, x, rope, bias)
        return self.norm(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, C, *spatial) -> logits (B, num_classes) (pooled features when num_classes=0)."""
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_mask: Tensor | None = None,
    ) -> list[Any] | tuple[Tensor, list[Any]]:
        """Features of selected blocks (timm's interface, used by ``features_only`` and DINO-style probes).

        Args:
            indices: last n blocks (int), or block indices (negative from the end); None = all.
            return_prefix_tokens: pair each intermediate with its prefix tokens (B, k, C).
            norm: apply the final norm to each intermediate.
            stop_early: skip blocks after the last requested one.
            output_fmt: ``"NCHW"`` channels first over the grid, (B, C, *grid_shape) for any ndim,
                or ``"NLC"`` tokens (B, N, C).
            intermediates_only: return only the list of intermediates.
            attn_mask: as in `forward_features`.
        Returns:
            the intermediates, or (final normalised tokens (B, k + N, C), intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; choose 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid_shape, ropes, bias = self._tokens(x, attn_mask)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, (block, rope) in enumerate(zip(blocks, ropes)):
            x = self._run_block(block, x, rope, bias)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        k = self.num_prefix_tokens
        prefix_tokens = [y[:, :k] for y in intermediates]
        intermediates = [y[:, k:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid_shape, -1).movedim(-1, 1).contiguous() for y in intermediates]
        if return_prefix_tokens and k:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def create_vit(pos_embed: PosEmbed = DEFAULT_POS_EMBED, **kwargs: Any) -> NDRopeVisionTransformer:
    """Build a ViT with the given position encoding; ``kwargs`` as `NDRopeVisionTransformer` (any timm
    `VisionTransformer` keyword, plus ``ndim``, ``rope_theta``, ``rope_resolution_mode``, ...).

    >>> create_vit("rope_axial", ndim=3, img_size=(8, 32, 32), patch_size=(2, 4, 4), embed_dim=192,
    ...            depth=6, num_heads=3, num_classes=10)   # video (B, 3, t, h, w), t, h, w multiples of the patch
    """
    return NDRopeVisionTransformer(pos_embed, **kwargs)


def set_resolution_mode(model: nn.Module, mode: ResolutionMode) -> None:
    """Set the RoPE resolution mode (see `NDRopeVisionTransformer.set_resolution_mode`) of every
    `NDRopeVisionTransformer` in ``model`` (the model itself, or e.g. a LightningModule holding it)."""
    found = [module for module in model.modules() if isinstance(module, NDRopeVisionTransformer)]
    if not found:
        raise TypeError(f"model ({type(model).__name__}) contains no NDRopeVisionTransformer")
    for vit in found:
        vit.set_resolution_mode(mode)
