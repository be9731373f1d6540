"""Packed variable-size batches (NaViT-style): images of several sizes in one sequence batch.

`NDRopeVisionTransformer.forward_packed(images)` runs a list of images of different sizes together.
Each image becomes one segment of T_i tokens (its own class / register tokens, then its patches), and
the segments are laid one after another in the rows of a (B, L, C) batch (`plan_packing`: longest
first, each into the first row with room, rows of at most ``max_tokens``). Positions stay per image:
  * absolute tables (learned: resampled to the image's grid; sincos, integer, binary: of its grid) are
    added before packing, by the model's own `_pos_embed`;
  * RoPE: each token gets its row of the table of its image's grid (positioned by the model's
    resolution mode relative to the training grid), (B, 1 or H, L, P) per block;
  * the attention bias (B, 1 or H, L, L) is 0 inside a segment (with ALiBi: the image's own distance
    bias) and -inf between segments, so no token attends to another image;
  * ``attn_logit_scale="log-length"`` scales each token's logits by its own image's length;
  * pooling and head run per image on its own tokens (any ``global_pool``, attention pooling included).
Padding at the end of a row attends only to padding and is never read. Every ``pos_embed`` packs, and
a packed forward equals the per-image forwards (tests/test_vit_packing.py). With patch dropout each
image drops its own patches; RoPE augmentation draws once per distinct grid, as a batch shares one draw.

Conventions as in timm's NaFlexViT (timm/models/naflexvit.py: row-major patches, per-sample RoPE
tables, an additive mask, pooling per image), which pads one image per row; several images per row is
NaViT's packing (Dehghani et al. 2023, https://arxiv.org/abs/2307.06304). The mask is dense, so
attention costs B * L^2 per head: rows as long as the longest image (the default) keep the cost near
that of a padded batch with one image per row.

Shape alphabet: B rows, L tokens per row, H heads, C channels, P rotated pairs, k prefix tokens;
image i has N_i patches (M_i kept by patch dropout) and T_i = k + N_i tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.layers import PatchDropoutWithIndices
from torch import Tensor

from ndrope._checks import check_int
from ndrope.functional import Rotation

from ._checks import check_images
from .attention import BlockInputs
from .rope import keep_tokens

if TYPE_CHECKING:
    from .model import NDRopeVisionTransformer


@dataclass(frozen=True)
class PackedLayout:
    """Where each image's tokens sit: image i fills tokens ``starts[i] .. starts[i] + lengths[i] - 1``
    of row ``rows[i]``; ``num_rows`` rows of ``seq_len`` tokens (B, L), padding after the last segment."""

    lengths: tuple[int, ...]
    rows: tuple[int, ...]
    starts: tuple[int, ...]
    num_rows: int
    seq_len: int

    def segment_ids(self, device: torch.device | str | None = None) -> Tensor:
        """(B, L) int64: the index of the image each token belongs to, -1 for padding."""
        ids = torch.full((self.num_rows, self.seq_len), -1, dtype=torch.long)
        for image, (row, start, length) in enumerate(zip(self.rows, self.starts, self.lengths)):
            ids[row, start : start + length] = image
        return ids.to(device)

    def attention_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(B, 1, L, L) bool, True = may attend (SDPA's convention): block-diagonal, the tokens of an image
        see each other only; padding sees padding (every query keeps a key, so no softmax row is empty)."""
        ids = self.segment_ids(device)
        return (ids[:, :, None] == ids[:, None, :]).unsqueeze(1)

    def pack(self, segments: Sequence[Tensor]) -> Tensor:
        """Per-image tensors (T_i, *rest) -> (B, L, *rest), zeros in the padding."""
        if len(segments) != len(self.lengths) or any(s.shape[0] != n for s, n in zip(segments, self.lengths)):
            got = [tuple(s.shape[:1]) for s in segments]
            raise ValueError(f"segments with leading sizes {got} do not match the layout's lengths={self.lengths}")
        rows = [[] for _ in range(self.num_rows)]
        for image in sorted(range(len(segments)), key=lambda i: (self.rows[i], self.starts[i])):
            rows[self.rows[image]].append(segments[image])
        rest = segments[0].shape[1:]
        padding = [segments[0].new_zeros((self.seq_len - sum(p.shape[0] for p in parts), *rest)) for parts in rows]
        return torch.stack([torch.cat([*parts, pad]) for parts, pad in zip(rows, padding)])

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """(B, L, *rest) -> the per-image tensors (T_i, *rest), in image order."""
        return [packed[row, start : start + n] for row, start, n in zip(self.rows, self.starts, self.lengths)]


def plan_packing(lengths: Sequence[int], max_tokens: int | None = None) -> PackedLayout:
    """Rows for segments of ``lengths`` tokens: longest first, each into the first row with room
    (first-fit decreasing; ties keep their order). ``max_tokens``: tokens per row, default the longest
    segment (rows then cost about what a padded one-image-per-row batch costs); it must hold the longest."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise ValueError(f"lengths={lengths!r} must be a non-empty sequence of token counts, one per image")
    for i, n in enumerate(lengths):
        check_int(f"lengths[{i}]", n)
    longest = max(lengths)
    if max_tokens is None:
        max_tokens = longest
    check_int("max_tokens", max_tokens)
    if max_tokens < longest:
        image = lengths.index(longest)
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold image {image}, which has {longest} tokens (prefix tokens + "
            f"patches); use max_tokens >= {longest}, or None for rows as long as the longest image"
        )
    rows, starts, fill = [0] * len(lengths), [0] * len(lengths), []
    for image in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[image] <= max_tokens), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[image], starts[image] = row, fill[row]
        fill[row] += lengths[image]
    return PackedLayout(tuple(lengths), tuple(rows), tuple(starts), len(fill), max(fill))


def _check_packed_images(model: NDRopeVisionTransformer, images: Sequence[Tensor]) -> None:
    if isinstance(images, Tensor):
        raise TypeError(
            f"images must be a list of (C, *spatial) tensors, got a tensor of shape {tuple(images.shape)}: "
            "for images of one size call the model itself, or pass list(images)"
        )
    if not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of (C, *spatial) tensors, got {type(images).__name__}")
    if not images:
        raise ValueError("images=[] is empty: pass a non-empty list of (C, *spatial) tensors")
    device = model.patch_embed.proj.weight.device
    for i, image in enumerate(images):
        check_images(model, image, name=f"images[{i}]", batched=False)
        if image.device != device:
            raise ValueError(f"images[{i}] is on {image.device} but the model is on {device}")


def _packed_rotations(
    model: NDRopeVisionTransformer, grids: list[tuple[int, ...]], rows: list[Tensor], layout: PackedLayout
) -> list[Rotation | None]:
    """Each block's (cos, sin), (B, 1 or H, L, P): token j of image i takes row ``rows[i][j]`` of the
    table of its grid (`NDRopeVisionTransformer.rotary_tables`); padding takes the identity."""
    if model.rope is None:
        return [None] * len(model.blocks)
    unique = list(dict.fromkeys(grids))
    tables = [model.rotary_tables(grid) for grid in unique]  # per grid: each block's (k + N, P) or (H, k + N, P)
    offsets, offset = {}, 1  # row 0 of the stacked tables is the identity
    for grid, per_block in zip(unique, tables):
        offsets[grid] = offset
        offset += per_block[0][0].shape[-2]
    index = torch.zeros(layout.num_rows, layout.seq_len, dtype=torch.long, device=rows[0].device)  # B, L
    for image, (grid, taken) in enumerate(zip(grids, rows)):
        start = layout.starts[image]
        index[layout.rows[image], start : start + taken.numel()] = taken + offsets[grid]
    gathered: dict[tuple[int, ...], Rotation] = {}  # blocks that share a table share its gather
    rotations = []
    for block in range(len(model.blocks)):
        parts = [per_block[block] for per_block in tables]
        key = tuple(id(cos) for cos, _ in parts)
        if key not in gathered:
            cos, sin = parts[0]
            shape = (*cos.shape[:-2], 1, cos.shape[-1])
            cos = torch.cat([cos.new_ones(shape)] + [c for c, _ in parts], dim=-2)
            sin = torch.cat([sin.new_zeros(shape)] + [s for _, s in parts], dim=-2)
            cos, sin = keep_tokens(cos, index), keep_tokens(sin, index)  # B, [H,] L, P
            if cos.dim() == 3:  # shared by the heads: B, 1, L, P
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            gathered[key] = (cos, sin)
        rotations.append(gathered[key])
    return rotations


def _packed_bias(
    model: NDRopeVisionTransformer,
    grids: list[tuple[int, ...]],
    rows: list[Tensor],
    layout: PackedLayout,
    device: torch.device,
) -> Tensor:
    """The additive logit bias (B, 1 or H, L, L), float32: the block-diagonal mask, plus ALiBi's
    distance bias of each image's grid (at its kept rows) inside its block."""
    mask = layout.attention_mask(device)
    heads = model.num_heads if model.alibi is not None else 1
    bias = torch.zeros((layout.num_rows, heads, layout.seq_len, layout.seq_len), device=device)
    bias = bias.masked_fill(~mask, float("-inf"))
    if model.alibi is not None:
        per_grid = {grid: model.attention_bias(grid) for grid in dict.fromkeys(grids)}  # H, k + N, k + N
        for image, (grid, taken) in enumerate(zip(grids, rows)):
            start, end = layout.starts[image], layout.starts[image] + taken.numel()
            bias[layout.rows[image], :, start:end, start:end] = per_grid[grid][:, taken][:, :, taken]
    return bias


def embed_packed(
    model: NDRopeVisionTransformer, images: Sequence[Tensor], *, max_tokens: int | None = None
) -> tuple[BlockInputs, PackedLayout]:
    """Images (C, *spatial) of any sizes -> what the model's blocks take, packed: tokens (B, L, C), each
    block's rotation (B, 1 or H, L, P), the bias (B, 1 or H, L, L), the logit scale (B, 1, L, 1) or None;
    and the layout. Images of one size are embedded together (one patch embedding, one table)."""
    _check_packed_images(model, images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[1:]), []).append(i)
    segments: list[Tensor] = [None] * len(images)  # T_i, C each
    grids: list[tuple[int, ...]] = [None] * len(images)
    rows: list[Tensor] = [None] * len(images)  # T_i rows of each image's grid tables (patch dropout keeps some)
    k = model.num_prefix_tokens
    for members in by_size.values():
        x = model.patch_embed(torch.stack([images[i] for i in members]))  # G, *grid_shape, C
        grid = tuple(x.shape[1:-1])
        x = model._pos_embed(x)  # G, k + N, C
        kept = None
        if isinstance(model.patch_drop, PatchDropoutWithIndices):
            x, kept = model.patch_drop(x)  # G, k + M, C and the kept patches (G, M), or None
        prefix = torch.arange(k, device=x.device)
        for j, i in enumerate(members):
            segments[i], grids[i] = x[j], grid
            rows[i] = torch.arange(x.shape[1], device=x.device) if kept is None else torch.cat((prefix, kept[j] + k))
    layout = plan_packing([segment.shape[0] for segment in segments], max_tokens)
    tokens = model.norm_pre(layout.pack(segments))
    scales = [model.logit_scale_for(n) for n in layout.lengths]
    logit_scale = None
    if any(scale is not None for scale in scales):
        scale_dtype = torch.promote_types(tokens.dtype, torch.float32)  # bf16 activations: a float32 scale
        per_token = [torch.full((n,), 1.0 if s is None else s, dtype=scale_dtype, device=tokens.device)
                     for n, s in zip(layout.lengths, scales)]  # fmt: skip
        logit_scale = layout.pack(per_token)[:, None, :, None]  # B, 1, L, 1 (padding 0: it attends to padding only)
    rotations = _packed_rotations(model, grids, rows, layout)
    bias = _packed_bias(model, grids, rows, layout, tokens.device)
    return BlockInputs(tokens, rotations, bias, logit_scale), layout


def forward_features_packed(
    model: NDRopeVisionTransformer, images: Sequence[Tensor], *, max_tokens: int | None = None
) -> list[Tensor]:
    """Images (C, *spatial) of any sizes -> each image's normalised tokens (T_i, C), run packed."""
    inputs, layout = embed_packed(model, images, max_tokens=max_tokens)
    return layout.unpack(model._forward_blocks(inputs))


def forward_packed(
    model: NDRopeVisionTransformer, images: Sequence[Tensor], *, max_tokens: int | None = None
) -> Tensor:
    """Images (C, *spatial) of any sizes -> logits (num_images, num_classes), each image pooled on its own
    tokens by the model's head (images with equally many tokens in one call)."""
    features = forward_features_packed(model, images, max_tokens=max_tokens)
    by_length: dict[int, list[int]] = {}
    for i, tokens in enumerate(features):
        by_length.setdefault(tokens.shape[0], []).append(i)
    order = [i for members in by_length.values() for i in members]
    logits = torch.cat(
        [model.forward_head(torch.stack([features[i] for i in members])) for members in by_length.values()]
    )
    return logits[torch.tensor(order, device=logits.device).argsort()]
