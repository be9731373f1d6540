"""`NDRopeVisionTransformer`: timm's ViT with one switch for the position encoding, at any input size.

The subclass changes only where positions enter. Per forward it reads the patch grid from the
patch embedding (timm's ``dynamic_img_size`` layout), then
  * adds an absolute table to the patch tokens (`_pos_embed`: learned, sincos, integer, binary),
  * computes the RoPE tables (`rotary_tables`, planned in `vit.rope`), the ALiBi bias
    (`attention_bias`) and the logit scale (`logit_scale_for`, ``attn_logit_scale``) once for that
    grid and hands them to every block, as timm's Eva does. Attention layers only apply what they are given.
Images of several sizes run together as one packed batch, each at its own positions
(`forward_packed`, `vit.packing`).
Blocks, MLPs, heads, pooling, init and checkpoints are timm's: every other `VisionTransformer`
keyword passes through to timm, and a plain timm ViT state dict loads into ``pos_embed="learned"``.

Shape alphabet: B batch, H heads, N tokens, D channels per head, P = D // 2 pairs, L blocks,
k prefix tokens (class + registers); spatial sizes are ``img_size`` / ``grid_shape`` tuples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from timm.layers import PatchDropout, PatchDropoutWithIndices, trunc_normal_
from timm.models import VisionTransformer, checkpoint
from torch import Tensor, nn

from ndrope._checks import check_choice, check_int, choices
from ndrope.functional import Rotation
from ndrope.modules import RESOLUTION_MODES, ResolutionMode

from . import packing
from ._checks import check_attn_mask, check_images, check_timm_keywords, per_axis, take_indices
from .attention import AttnLogitScale, BlockInputs, RopeAttention, RopeBlock, log_length_scale
from .patch_embed import PatchEmbed2d, PatchEmbedND
from .pos_embed import BINARY_BITS, AlibiBias, FixedPosEmbed, IntegerNorm, resample_pos_embed
from .rope import DEFAULT_RESOLUTION_MODE, RopeKind, VisionRecipe, create_rope, keep_tokens


class _Encoding(NamedTuple):
    absolute: str | None  # "learned", "sincos", "integer", "binary": a table added to the patch tokens
    rope: RopeKind | None  # fixed frequencies shared by the blocks, or learned per block
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
PosEmbed = Literal[tuple(_ENCODINGS)]  # type: ignore[valid-type]
#: Every accepted ``pos_embed`` value.
POS_EMBED_CHOICES: tuple[str, ...] = choices(PosEmbed)
#: ``pos_embed`` of the registered timm models when none is given.
DEFAULT_POS_EMBED = "rope_mixed"


def applicable_resolution_modes(pos_embed: PosEmbed, rope_recipe: VisionRecipe | None = None) -> tuple[str, ...]:
    """The RoPE resolution modes that change the positions of a model built with these arguments:
    all of `ndrope.RESOLUTION_MODES` for RoPE on grid indices, none without RoPE or with a recipe
    (its coordinate law places every grid). Setting any other mode is an error."""
    rope = _ENCODINGS[check_choice("pos_embed", pos_embed, PosEmbed)].rope
    return RESOLUTION_MODES if rope and rope_recipe is None else ()


class NDRopeVisionTransformer(VisionTransformer):
    """Vision Transformer over 1D-4D inputs with a selectable position encoding.

    >>> model = NDRopeVisionTransformer("rope_mixed", img_size=32, patch_size=4, embed_dim=192,
    ...                                 depth=6, num_heads=3, num_classes=10)
    >>> model(torch.randn(8, 3, 32, 32)).shape, model(torch.randn(8, 3, 48, 48)).shape
    (torch.Size([8, 10]), torch.Size([8, 10]))

    Input (B, C, *spatial) with ``len(spatial) == ndim``; every spatial size must be a multiple of
    the patch size (or build with ``dynamic_img_pad=True`` to zero-pad). Any grid works, not only the
    training one: RoPE, ALiBi and the fixed tables are computed for the actual grid, a learned table
    is interpolated (as timm does with ``dynamic_img_size``); in training too, so a model can be
    trained at several sizes (`vit.sizes`) with ``img_size`` as the reference grid. A list of images
    of different sizes runs as one packed batch: `forward_packed` (every ``pos_embed``).

    Args:
        pos_embed: one of `POS_EMBED_CHOICES` (the README's table): ``"learned"`` timm's table;
            ``"sincos"`` fixed sinusoids per axis; ``"rope_axial"`` fixed RoPE shared by all blocks;
            ``"rope_mixed"`` RoPE-Mixed (Heo et al.), learned per block and head; ``"rope_*+learned"``
            both; ``"alibi"`` a per-head distance bias on the logits; ``"integer"`` / ``"binary"`` the
            patch index as a number / as bits; ``"none"`` no positions (permutation-equivariant).
        ndim: A, number of spatial axes: 2 images (B, C, h, w), 3 video (B, C, t, h, w),
            4 volumes over time (B, C, t, d, h, w), 1 sequences (B, C, n).
        img_size, patch_size: training input size and patch size, an int or one entry per axis.
        embed_dim, depth, num_heads: width C, number of blocks L, heads H (D = C / H).
        dynamic_img_size: timm's switch, always on here (every grid works); False is refused.
        rope_theta, rope_recipe, rope_shift, rope_jitter, rope_rescale: the RoPE frequencies (a
            ladder of base ``rope_theta``, or a `VisionRecipe` name with its coordinate law) and the
            DINOv3-style coordinate augmentation in training, see `vit.rope.create_rope`.
        rope_resolution_mode: RoPE coordinates at grids other than the training grid, see
            `set_resolution_mode`; default `DEFAULT_RESOLUTION_MODE` where `applicable_resolution_modes`.
        attn_logit_scale: ``"none"`` or ``"log-length"`` (attention logits times log(n) / log(n_train)
            at other sequence lengths), see `set_attn_logit_scale`.
        integer_norm, binary_bits: options of ``"integer"`` / ``"binary"``, see `FixedPosEmbed`.
        embed_layer: default `PatchEmbed2d` (timm's, checkpoint compatible) in 2D, `PatchEmbedND` otherwise.
        block_fn, attn_layer: `RopeBlock` / `RopeAttention` or subclasses (they take the per-forward
            position tables).
        **kwargs: every other `timm.models.VisionTransformer` keyword (in_chans, num_classes,
            global_pool, class_token, reg_tokens, drop rates, ...), checked by timm's annotations.

    Options of an encoding the model does not use (``rope_theta`` without RoPE, ``integer_norm``
    without ``"integer"``) are ignored, so one config can sweep ``pos_embed``; a resolution mode or a
    recipe that cannot apply is an error.
    """

    def __init__(
        self,
        pos_embed: PosEmbed = DEFAULT_POS_EMBED,
        *,
        ndim: int = 2,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        dynamic_img_size: bool = True,
        rope_theta: float | None = None,
        rope_recipe: VisionRecipe | None = None,
        rope_resolution_mode: ResolutionMode | None = None,
        rope_shift: float = 0.0,
        rope_jitter: float = 1.0,
        rope_rescale: float = 1.0,
        attn_logit_scale: AttnLogitScale = "none",
        integer_norm: IntegerNorm = "train",
        binary_bits: int = BINARY_BITS,
        embed_layer: Callable[..., nn.Module] | None = None,
        block_fn: type[RopeBlock] = RopeBlock,
        attn_layer: type[RopeAttention] = RopeAttention,
        **kwargs: Any,
    ) -> None:
        encoding = _ENCODINGS[check_choice("pos_embed", pos_embed, PosEmbed)]
        check_int("ndim", ndim)  # 2 images, 3 video, 4 volumes over time, 1 sequences
        img_size, patch_size = per_axis("img_size", img_size, ndim), per_axis("patch_size", patch_size, ndim)
        if any(size % patch for size, patch in zip(img_size, patch_size)):
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size} on every axis")
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            check_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if dynamic_img_size is not True:
            raise ValueError(f"dynamic_img_size={dynamic_img_size!r}: the model always reads the grid from the input "
                             "(any multiple of the patch size works), so only dynamic_img_size=True is accepted")  # fmt: skip
        if rope_recipe is not None and encoding.rope is None:
            raise ValueError(f"rope_recipe needs a RoPE pos_embed (rope_axial, rope_mixed, ...), got pos_embed={pos_embed!r}")
        for name, layer, base in (("attn_layer", attn_layer, RopeAttention), ("block_fn", block_fn, RopeBlock)):
            if not (isinstance(layer, type) and issubclass(layer, base)):
                raise ValueError(
                    f"{name}={layer!r} is not supported: it must be {base.__name__} or a subclass, "
                    "which take the per-forward position tables"
                )
        check_timm_keywords(kwargs)
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            pos_embed="learn" if encoding.absolute == "learned" else "none", dynamic_img_size=True,
            embed_layer=embed_layer or (PatchEmbed2d if ndim == 2 else PatchEmbedND), block_fn=block_fn,
            attn_layer=attn_layer, **kwargs,
        )  # fmt: skip
        self.pos_embed_type, self.rope_recipe, self.ndim, self.num_heads = pos_embed, rope_recipe, ndim, num_heads
        grid_size = tuple(self.patch_embed.grid_size)
        self.fixed_pos_embed = None
        if encoding.absolute in ("sincos", "integer", "binary"):
            self.fixed_pos_embed = FixedPosEmbed(
                encoding.absolute, embed_dim, grid_size, integer_norm=integer_norm, binary_bits=binary_bits
            )
        self.rope, self.rope_plan = None, None
        if encoding.rope:
            self.rope, self.rope_plan = create_rope(
                encoding.rope, head_dim=embed_dim // num_heads, num_heads=num_heads, depth=depth, grid_size=grid_size,
                theta=rope_theta, recipe=rope_recipe, shift=rope_shift, jitter=rope_jitter, rescale=rope_rescale,
            )  # fmt: skip
        self.alibi = AlibiBias(num_heads) if encoding.alibi else None
        if isinstance(self.patch_drop, PatchDropout):
            # the kept indices select the matching rows of the RoPE tables and the logit bias
            self.patch_drop = PatchDropoutWithIndices(self.patch_drop.prob, num_prefix_tokens=self.num_prefix_tokens)
        self._resolution_mode: ResolutionMode | None = None
        if rope_resolution_mode is not None or applicable_resolution_modes(pos_embed, rope_recipe):
            self.set_resolution_mode(DEFAULT_RESOLUTION_MODE if rope_resolution_mode is None else rope_resolution_mode)
        self._attn_logit_scale: AttnLogitScale = "none"
        self.set_attn_logit_scale(attn_logit_scale)

    def reset_parameters(self) -> None:
        """Meta-device init: this module's own tokens and learned table, drawn as timm's ``init_weights`` does."""
        with torch.no_grad():
            if self.pos_embed is not None:
                trunc_normal_(self.pos_embed, std=0.02)
            for token in (t for t in (self.cls_token, self.reg_token) if t is not None):
                nn.init.normal_(token, std=1e-6)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's set plus the learned RoPE-Mixed frequencies (Heo et al. exclude them too)."""
        return super().no_weight_decay() | {"rope.freqs"}

    @property
    def rope_resolution_mode(self) -> ResolutionMode | None:
        """How RoPE positions grids other than the training grid (None where no mode applies)."""
        return self._resolution_mode

    def set_resolution_mode(self, mode: ResolutionMode) -> None:
        """Choose the RoPE coordinates for grids other than the training grid (an inference-time switch).

        ``"extrapolate"``: integer patch indices, a larger grid reaches new positions;
        ``"interpolate"``: positions rescaled onto the training grid's range (EVA-02, FlexiViT style);
        ``"ntk"``: integer indices with NTK-aware frequency scaling. The training grid itself is
        unaffected. A model without RoPE, or with a ``rope_recipe`` (whose coordinate law places
        every grid), has no mode to choose: setting one raises ValueError.
        """
        applicable = applicable_resolution_modes(self.pos_embed_type, self.rope_recipe)
        if not applicable:
            reason = f"rope_recipe={self.rope_recipe!r} places every grid" if self.rope else "it has no RoPE"
            raise ValueError(f"rope_resolution_mode={mode!r} does not apply to pos_embed={self.pos_embed_type!r}: {reason}")
        self._resolution_mode = check_choice("rope_resolution_mode", mode, ResolutionMode)

    @property
    def attn_logit_scale(self) -> AttnLogitScale:
        """How the attention logits follow the sequence length: ``"none"`` or ``"log-length"``."""
        return self._attn_logit_scale

    def set_attn_logit_scale(self, mode: AttnLogitScale) -> None:
        """Scale the attention logits by the sequence length (an inference-time switch, as `set_resolution_mode`).

        ``"none"``: logits as trained. ``"log-length"``: a sequence of n tokens (k prefix + N patches: the
        keys every query attends to, after patch dropout) gets its logits times ``log(n) / log(n_train)``,
        n_train = k + the patches of the training grid (``img_size``): the identity there, sharper attention
        over a larger grid, softer over a smaller one (`vit.attention.log_length_scale`); a packed batch
        scales each image by its own n. It applies to every ``pos_embed``: attention thins out over more
        keys however positions are encoded. ALiBi's distance bias is added unscaled.
        """
        mode = check_choice("attn_logit_scale", mode, AttnLogitScale)
        reference = self.num_prefix_tokens + math.prod(self.patch_embed.grid_size)
        if mode == "log-length" and reference < 2:
            raise ValueError(
                f"attn_logit_scale='log-length' needs at least 2 tokens at the training size (log 1 = 0): this model "
                f"has {reference} (img_size={tuple(self.patch_embed.img_size)}, {self.num_prefix_tokens} prefix tokens)"
            )
        self._attn_logit_scale = mode

    def logit_scale_for(self, num_tokens: int) -> float | None:
        """The factor on the attention logits of a sequence of ``num_tokens`` (k + N) tokens; None: identity."""
        reference = self.num_prefix_tokens + math.prod(self.patch_embed.grid_size)
        if self._attn_logit_scale == "none" or num_tokens == reference:
            return None
        return log_length_scale(num_tokens, reference)

    @property
    def augments_positions(self) -> bool:
        """Whether this forward draws RoPE coordinate augmentation (training mode with it configured)."""
        return self.training and self.rope_plan is not None and self.rope_plan.augments

    def rotary_tables(self, grid_shape: Sequence[int], keep: Tensor | None = None) -> list[Rotation | None]:
        """The (cos, sin) each block rotates q and k by, for a grid; ``None`` entries without RoPE.

        Axial: one (k + N, P) pair shared by all blocks (cached for the training grid by ndrope).
        Mixed: one (H, k + N, P) pair per block, all computed together. The k prefix rows are the
        identity: class and register tokens are not rotated. ``keep`` (B, k + M): the token indices
        patch dropout kept; the tables are then (B, 1 or H, k + M, P).
        """
        if self.rope is None:
            return [None] * len(self.blocks)
        return self.rope_plan.rotations(
            self.rope,
            grid_shape,
            mode=self._resolution_mode,
            training=self.training,
            num_prefix_tokens=self.num_prefix_tokens,
            keep=keep,
            dtype=self.patch_embed.proj.weight.dtype,  # float64 tables for a float64 model
        )

    def attention_bias(self, grid_shape: Sequence[int]) -> Tensor | None:
        """The additive logit bias (H, k + N, k + N) shared by all blocks (ALiBi), or ``None``."""
        if self.alibi is None:
            return None
        return self.alibi(tuple(grid_shape), num_prefix_tokens=self.num_prefix_tokens)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Patch tokens (B, *grid_shape, C) -> (B, k + N, C): absolute table added, prefix tokens prepended."""
        B, *grid_shape, C = x.shape
        x = x.reshape(B, -1, C)
        prefix = [token.expand(B, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        table, covers_prefix = None, False
        if self.pos_embed is not None:
            # timm's layouts: rows for the prefix tokens too (original ViT), or patches only (no_embed_class)
            covers_prefix = not self.no_embed_class
            k = self.num_prefix_tokens if covers_prefix else 0
            table = resample_pos_embed(self.pos_embed, grid_shape, self.patch_embed.grid_size, num_prefix_tokens=k)
        elif self.fixed_pos_embed is not None:
            table = self.fixed_pos_embed(grid_shape, device=x.device).to(x.dtype)  # N, C
        if table is not None and not covers_prefix:
            x = x + table
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if table is not None and covers_prefix:
            x = x + table
        return self.pos_drop(x)

    def _embed(self, x: Tensor, attn_mask: Tensor | None) -> tuple[BlockInputs, tuple[int, ...]]:
        """Input (B, C, *spatial) -> what the blocks take (tokens (B, k + N, C), ...), and grid_shape.

        After patch dropout the tokens are (B, k + M, C), the rotations (B, 1 or H, k + M, P) and the
        bias (B, H or 1, k + M, k + M): kept tokens keep their own positions.
        """
        check_images(self, x)
        x = self.patch_embed(x)  # B, *grid_shape, C
        grid_shape = tuple(x.shape[1:-1])
        x = self._pos_embed(x)
        bias = self.attention_bias(grid_shape)
        if attn_mask is not None:
            check_attn_mask(self, attn_mask, x.shape[0], x.shape[1])
            if attn_mask.dtype == torch.bool:  # SDPA convention: True = may attend
                attn_mask = torch.zeros(attn_mask.shape, device=x.device).masked_fill(~attn_mask, float("-inf"))
            bias = attn_mask if bias is None else bias + attn_mask
        keep = None
        if isinstance(self.patch_drop, PatchDropoutWithIndices):
            (B, tokens, _), k = x.shape, self.num_prefix_tokens
            x, kept_patches = self.patch_drop(x)
            if kept_patches is not None:
                keep = torch.cat((torch.arange(k, device=x.device).expand(B, k), kept_patches + k), dim=1)  # B, k + M
                if bias is not None:  # rows, then columns: B, H or 1, k + M, k + M
                    bias = bias.reshape((1,) * (4 - bias.dim()) + bias.shape).expand(B, -1, tokens, tokens)
                    bias = keep_tokens(bias, keep, has_batch=True).transpose(-1, -2)
                    bias = keep_tokens(bias, keep, has_batch=True).transpose(-1, -2)
        scale = self.logit_scale_for(x.shape[1])
        return BlockInputs(self.norm_pre(x), self.rotary_tables(grid_shape, keep), bias, scale), grid_shape

    def _run_block(self, block: nn.Module, x: Tensor, rope: Rotation | None, inputs: BlockInputs) -> Tensor:
        kwargs = dict(rope=rope, attn_mask=inputs.bias, logit_scale=inputs.logit_scale)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, **kwargs)
        return block(x, **kwargs)

    def _forward_blocks(self, inputs: BlockInputs) -> Tensor:
        """Every block, then the final norm: tokens (B, N, C) -> (B, N, C)."""
        x = inputs.tokens
        for block, rope in zip(self.blocks, inputs.ropes):
            x = self._run_block(block, x, rope, inputs)
        return self.norm(x)

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, C, *spatial) -> normalised tokens (B, k + N, C).

        ``attn_mask``: optional mask broadcastable to (B, H, k + N, k + N), boolean (True = may
        attend, as in SDPA) or additive float; combined with the model's own bias.
        """
        return self._forward_blocks(self._embed(x, attn_mask)[0])

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, C, *spatial) -> logits (B, num_classes) (pooled features when num_classes=0)."""
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask))

    def forward_features_packed(self, images: Sequence[Tensor], *, max_tokens: int | None = None) -> list[Tensor]:
        """Images of different sizes, each (C, *spatial), run packed (`vit.packing`): rows of at most
        ``max_tokens`` tokens (default: the longest image's), a block-diagonal mask, each image at its own
        positions. Returns each image's normalised tokens (k + N_i, C), as ``forward_features(image[None])[0]``."""
        return packing.forward_features_packed(self, images, max_tokens=max_tokens)

    def forward_packed(self, images: Sequence[Tensor], *, max_tokens: int | None = None) -> Tensor:
        """Images of different sizes, each (C, *spatial), run packed (see `forward_features_packed`) and
        pooled per image: logits (num_images, num_classes), row i as ``forward(images[i][None])[0]``."""
        return packing.forward_packed(self, images, max_tokens=max_tokens)

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
        take = take_indices(len(self.blocks), indices)
        inputs, grid_shape = self._embed(x, attn_mask)
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        intermediates, x = [], inputs.tokens
        for i, (block, rope) in enumerate(zip(blocks, inputs.ropes)):
            x = self._run_block(block, x, rope, inputs)
            if i in take:
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
