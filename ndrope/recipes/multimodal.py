"""Multimodal RoPE: Qwen2-VL / Qwen2.5-VL / Qwen3-VL M-RoPE (frequencies and positions), and the
temporal-frequency variants for video (VideoRoPE, HoPE).

M-RoPE gives each (t, h, w) axis a *section of one shared 1D ladder*, not a ladder of its own: pair j keeps
the text model's frequency ``theta ** (-2j / D)`` and only reads a different coordinate. For text tokens all
three coordinates are equal, so text is exactly 1D RoPE.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_number
from ._base import RopeRecipe
from .language import standard

#: Which transformers release's rule advances the text after a grid:
#: "max_hw" (transformers >= 5.3): ``start + max(h, w) // spatial_merge_size``, the time axis is ignored;
#: "max_position" (transformers 4.x): one past the grid's largest position id (``max(t, h, w)`` for Qwen2-VL).
TextAdvance = Literal["max_hw", "max_position"]
QwenVersion = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def mrope(
    head_dim: int,
    mrope_section: Sequence[int],
    *,
    theta: float = 1000000.0,
    interleaved: bool = False,
    ladder: RopeRecipe | None = None,
) -> RopeRecipe:
    """M-RoPE frequencies F (3, D // 2) for (t, h, w) positions; "half" layout.

    ``interleaved=False`` (Qwen2-VL, Qwen2.5-VL): pairs ``[0, s_t)`` read t, the next ``s_h`` read h, the next
    ``s_w`` read w; ``mrope_section = (s_t, s_h, s_w)`` must add up to ``head_dim // 2``.
    ``interleaved=True`` (Qwen3-VL, MRoPE-I): pair j reads h when ``j % 3 == 1 and j < 3 * s_h``, w when
    ``j % 3 == 2 and j < 3 * s_w``, t otherwise.
    ``ladder`` (a 1D recipe, e.g. `yarn`) replaces the default ``standard(head_dim, theta=theta)`` ladder; its
    attention scale carries over.
    """
    sections = tuple(int(s) for s in mrope_section)
    if len(sections) != 3 or any(s < 0 for s in sections):
        raise ValueError(f"mrope_section={tuple(mrope_section)} must be three non-negative ints (t, h, w)")
    base = standard(head_dim, theta=theta) if ladder is None else ladder
    if base.n_axes != 1 or base.freqs.dim() != 2:
        raise ValueError(f"ladder must be a 1D recipe with freqs (1, P), got shape {tuple(base.freqs.shape)}")
    pairs = base.freqs.shape[-1]
    axis = torch.zeros(pairs, dtype=torch.long)
    if interleaved:
        index = torch.arange(pairs)
        axis[(index % 3 == 1) & (index < 3 * sections[1])] = 1
        axis[(index % 3 == 2) & (index < 3 * sections[2])] = 2
    else:
        if sum(sections) != pairs:
            raise ValueError(f"mrope_section={sections} must add up to the ladder's {pairs} pairs")
        axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))
    freqs = torch.zeros(3, pairs, dtype=torch.float64)
    freqs[axis, torch.arange(pairs)] = base.freqs[0]
    return RopeRecipe(freqs=freqs, layout=base.layout, attention_scale=base.attention_scale)


def video_temporal_bands(
    head_dim: int,
    temporal_pairs: int,
    *,
    theta: float = 1000000.0,
    zero_temporal: bool = False,
) -> RopeRecipe:
    """Video RoPE with time on the *lowest* frequencies of one shared ladder, F (3, D // 2) for (t, h, w).

    VideoRoPE's low-frequency temporal allocation (Wei et al. 2025, https://arxiv.org/abs/2502.05173): the
    ``temporal_pairs`` slowest pairs read t, the faster ones alternate h, w, h, w, ... (interleaved spatial
    frequencies). ``zero_temporal=True`` sets those temporal pairs to zero frequency, as HoPE (Li et al. 2025,
    https://arxiv.org/abs/2505.20444) does for its temporal channels: they then carry no position at all.
    """
    theta = check_number("theta", theta)
    base = standard(head_dim, theta=theta).freqs[0]
    pairs = base.numel()
    check_int("temporal_pairs", temporal_pairs, minimum=0)
    if temporal_pairs > pairs:
        raise ValueError(f"temporal_pairs={temporal_pairs} exceeds head_dim // 2 = {pairs}")
    spatial = pairs - temporal_pairs
    freqs = torch.zeros(3, pairs, dtype=torch.float64)
    index = torch.arange(spatial)
    freqs[1 + index % 2, index] = base[:spatial]
    if not zero_temporal:
        freqs[0, spatial:] = base[spatial:]
    return RopeRecipe(freqs=freqs, layout="half")


def _grids(grid_thw: Tensor | Sequence[Sequence[int]] | None, name: str) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = torch.as_tensor(grid_thw).tolist()
    for row in rows:
        if len(row) != 3 or any(int(v) < 1 for v in row):
            raise ValueError(f"{name} rows must be (t, h, w) positive ints, got {row}")
    return [tuple(int(v) for v in row) for row in rows]


def qwen_vl_positions(
    mm_token_type_ids: Tensor,
    *,
    image_grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
    video_grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
    attention_mask: Tensor | None = None,
    spatial_merge_size: int = 2,
    version: QwenVersion = "qwen2_vl",
    second_per_grid_ts: Sequence[float] | Tensor | None = None,
    tokens_per_second: float = 2.0,
    text_advance: TextAdvance = "max_hw",
) -> tuple[Tensor, Tensor]:
    """M-RoPE positions of a (padded) batch, as transformers' ``get_rope_index`` computes them.

    Args:
        mm_token_type_ids: (B, N) ints, 0 text, 1 image, 2 video token (what the Qwen processors return).
            Each run of equal non-zero ids is one grid, consuming the next row of ``image_grid_thw`` /
            ``video_grid_thw`` (rows (t, h, w) in patches, before merging; shared by the whole batch, in order).
        attention_mask: (B, N), 0 for padding. Padding gets position 0; the rest is laid out as if unpadded.
        spatial_merge_size: patches merged per LLM token along h and w.
        version: ``"qwen2_vl"`` (frame k at time k), ``"qwen2_5_vl"`` (absolute time: video frame k at
            ``int(k * second_per_grid_t * tokens_per_second)``, one ``second_per_grid_ts`` entry per video,
            default 1), ``"qwen3_vl"`` (each video frame is its own (1, h, w) grid; the processor separates
            frames by timestamp text tokens, which carry the time).
        text_advance: ``"max_hw"`` (transformers >= 5.3) or ``"max_position"`` (4.x); see `TextAdvance`.
            (transformers 5.x before 5.18, 5.17 at least, truncated ``second_per_grid_t`` to an int, so 0.5 s
            put every frame at one time; this follows 4.x and 5.18+, which keep the fraction.)
    Returns:
        positions (B, N, 3) int64 (t, h, w) per token, and rope_deltas (B,) int64 (largest position + 1 minus the
        unpadded length): decoding token i of a sequence (counted without padding) sits at ``i + rope_deltas``
        on every axis (`qwen_vl_decode_positions`).
    """
    check_choice("version", version, QwenVersion)
    check_choice("text_advance", text_advance, TextAdvance)
    check_int("spatial_merge_size", spatial_merge_size)
    types = torch.as_tensor(mm_token_type_ids)
    if types.dim() != 2:
        raise ValueError(f"mm_token_type_ids must be (B, N), got shape {tuple(types.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(types.shape):
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match mm_token_type_ids {tuple(types.shape)}"
        )
    images = iter(_grids(image_grid_thw, "image_grid_thw"))
    videos = _grids(video_grid_thw, "video_grid_thw")
    if version == "qwen3_vl":
        videos = [(1, h, w) for t, h, w in videos for _ in range(t)]
    videos = iter(videos)
    seconds = iter(torch.as_tensor(second_per_grid_ts).tolist() if second_per_grid_ts is not None else [])
    batch, length = types.shape
    positions = torch.zeros(batch, length, 3, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        keep = torch.ones(length, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        kinds = types[b].cpu()[keep].tolist()
        parts, start = [], 0
        for kind, run in itertools.groupby(kinds):
            count = len(list(run))
            if kind == 0:
                parts.append(torch.arange(start, start + count)[:, None].expand(-1, 3))
                start += count
                continue
            if kind not in (1, 2):
                raise ValueError(f"mm_token_type_ids must hold 0 (text), 1 (image) or 2 (video), got {kind}")
            try:
                t, h, w = next(images if kind == 1 else videos)
            except StopIteration:
                name = "image_grid_thw" if kind == 1 else "video_grid_thw"
                raise ValueError(f"more {'image' if kind == 1 else 'video'} runs than rows in {name}") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != count:
                raise ValueError(f"a run of {count} vision tokens does not match grid (t, h, w)=({t}, {h}, {w}) "
                                 f"with spatial_merge_size={spatial_merge_size} ({t * gh * gw} tokens)")
            interval = 1.0
            if version == "qwen2_5_vl" and kind == 2:
                interval = tokens_per_second * next(seconds, 1)
            time = (torch.arange(t) * interval).long() + start
            grid = torch.stack(torch.meshgrid(time, torch.arange(gh) + start, torch.arange(gw) + start,
                                              indexing="ij"), dim=-1).reshape(-1, 3)
            parts.append(grid)
            start = start + max(h, w) // spatial_merge_size if text_advance == "max_hw" else int(grid.max()) + 1
        if parts:
            sequence = torch.cat(parts)
            positions[b, keep] = sequence
            deltas[b] = int(sequence.max()) + 1 - sequence.shape[0]
    return positions.to(types.device), deltas.to(types.device)


def qwen_vl_decode_positions(rope_deltas: Tensor, start: int | Tensor, length: int = 1) -> Tensor:
    """Positions (B, length, 3) of ``length`` new tokens after a prompt, as transformers decodes with a cache.

    Token ``start + i`` (counted as transformers counts: the cache length, or the unpadded length for a padded
    batch) sits at ``start + i + rope_deltas[b]`` on all three axes. ``start`` is an int or (B,) ints.
    """
    check_int("length", length)
    deltas = torch.as_tensor(rope_deltas).reshape(-1).long()
    first = torch.as_tensor(start, device=deltas.device).long().reshape(-1)
    index = first[:, None] + torch.arange(length, device=deltas.device) + deltas[:, None]  # (B, length)
    return index[..., None].expand(-1, -1, 3).contiguous()
