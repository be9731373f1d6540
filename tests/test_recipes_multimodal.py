"""Multimodal recipes against transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL code.

Positions: `qwen_vl_positions` equals ``get_rope_index`` exactly (integers) for text only, text+image+text,
two images, image first, a video with more frames than its height/width, video then image, and a padded
batch; the decode offset equals ``compute_3d_position_ids`` and the positions of appended text.
Frequencies: `mrope` equals the rotary modules' ``recomposition_frequencies`` (sectioned and interleaved).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from recipe_parity import F32_FREQ_RTOL, F64_TOL, assert_no_worse_than_peer, max_abs, max_rel, report

import ndrope
from ndrope import recipes

# 5.18: the first release whose rope API these tests call, with Qwen2.5-VL time steps not truncated to int (5.17)
transformers = pytest.importorskip("transformers", minversion="5.18")
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VLModel,
    Qwen2VLRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLTextRotaryEmbedding  # noqa: E402

MERGE = 2
TOKENS_PER_SECOND = 4
TEXT = dict(hidden_size=64, num_attention_heads=2, head_dim=32)
CONFIGS = {
    "qwen2_vl": (Qwen2VLModel, Qwen2VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
        vision_config={"spatial_merge_size": MERGE})),
    "qwen2_5_vl": (Qwen2_5_VLModel, Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
        vision_config={"spatial_merge_size": MERGE, "tokens_per_second": TOKENS_PER_SECOND})),
    "qwen3_vl": (Qwen3VLModel, Qwen3VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                                 "mrope_interleaved": True}},
        vision_config={"spatial_merge_size": MERGE})),
}

# A sequence: text runs (int) and grids ("image" | "video", (t, h, w) in patches, before the 2x2 merge).
SCENARIOS = {
    "text_only": [7],
    "text_image_text": [3, ("image", (1, 4, 6)), 4],
    "two_images": [2, ("image", (1, 4, 4)), 1, ("image", (1, 6, 2)), 3],
    "image_first": [("image", (1, 4, 4)), 5],
    "video_more_frames_than_hw": [2, ("video", (8, 4, 4)), 3],
    "video_then_image": [1, ("video", (3, 4, 6)), 2, ("image", (1, 4, 4)), 2],
}
SECONDS = [0.5, 1.25]  # Qwen2.5-VL second_per_grid_t per video (time step 2 and 5 with 4 tokens per second)


def peer(version: str):
    """The real ``get_rope_index`` / ``get_vision_position_ids`` / ``compute_3d_position_ids``, on a minimal object."""
    model_cls, config = CONFIGS[version]
    attrs = {name: getattr(model_cls, name) for name in ("get_rope_index", "get_vision_position_ids",
                                                        "compute_3d_position_ids")}
    model = type(f"Tiny{model_cls.__name__}", (), attrs)()
    model.config, model.rope_deltas = config, None
    return model, config


def build(segments, version: str):
    """mm_token_type_ids (N,) and the image / video grid rows of one sequence, as the Qwen processors lay them out
    (Qwen3-VL: each video frame is its own run, after two timestamp text tokens)."""
    types, images, videos = [], [], []
    for segment in segments:
        if isinstance(segment, int):
            types += [0] * segment
            continue
        kind, (t, h, w) = segment
        per_frame = (h // MERGE) * (w // MERGE)
        if kind == "image":
            images.append((t, h, w))
            types += [1] * (t * per_frame)
        elif version == "qwen3_vl":
            videos.append((t, h, w))
            for _ in range(t):
                types += [0, 0] + [2] * per_frame
        else:
            videos.append((t, h, w))
            types += [2] * (t * per_frame)
    return types, images, videos


def batch(sequences, version: str, *, pad_left: bool = True):
    built = [build(s, version) for s in sequences]
    length = max(len(types) for types, _, _ in built)
    types = torch.zeros(len(built), length, dtype=torch.long)
    mask = torch.zeros(len(built), length, dtype=torch.long)
    for b, (row, _, _) in enumerate(built):
        where = slice(length - len(row), length) if pad_left else slice(0, len(row))
        types[b, where] = torch.tensor(row)
        mask[b, where] = 1
    images = [g for _, i, _ in built for g in i] or None
    videos = [g for _, _, v in built for g in v] or None
    return types, mask, images, videos


def both(version: str, types, mask, images, videos, text_advance="max_hw"):
    model, config = peer(version)
    kwargs = {}
    if version == "qwen2_5_vl" and videos:
        kwargs["second_per_grid_ts"] = torch.tensor(SECONDS[: len(videos)])
    theirs, their_deltas = model.get_rope_index(
        types.clone(), mm_token_type_ids=types, attention_mask=mask,
        image_grid_thw=None if images is None else torch.tensor(images),
        video_grid_thw=None if videos is None else torch.tensor(videos), **kwargs)
    ours, our_deltas = recipes.qwen_vl_positions(
        types, image_grid_thw=images, video_grid_thw=videos, attention_mask=mask, spatial_merge_size=MERGE,
        version=version, second_per_grid_ts=kwargs.get("second_per_grid_ts"), tokens_per_second=TOKENS_PER_SECOND,
        text_advance=text_advance)
    return ours, our_deltas, theirs.permute(1, 2, 0), their_deltas.reshape(-1)


@pytest.mark.parametrize("version", list(CONFIGS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_positions_match_get_rope_index(version, scenario):
    types, mask, images, videos = batch([SCENARIOS[scenario]], version)
    ours, our_deltas, theirs, their_deltas = both(version, types, None, images, videos)
    assert torch.equal(ours, theirs), f"{version}/{scenario}:\nours {ours[0].T}\ntheirs {theirs[0].T}"
    assert torch.equal(our_deltas, their_deltas)


@pytest.mark.parametrize("version", list(CONFIGS))
@pytest.mark.parametrize("pad_left", [True, False])
def test_padded_batch_matches_get_rope_index(version, pad_left):
    sequences = [SCENARIOS["video_then_image"], SCENARIOS["text_only"], SCENARIOS["image_first"]]
    types, mask, images, videos = batch(sequences, version, pad_left=pad_left)
    ours, our_deltas, theirs, their_deltas = both(version, types, mask, images, videos)
    assert torch.equal(ours, theirs)
    assert torch.equal(our_deltas, their_deltas)
    assert (ours[mask == 0] == 0).all()


def test_video_time_axis_differs_between_versions():
    """The time axis is the one place the three versions differ: index, absolute time, per-frame grids."""
    types, _, images, videos = batch([SCENARIOS["video_more_frames_than_hw"]], "qwen2_vl")
    t2, _, _, _ = both("qwen2_vl", types, None, images, videos)
    t25, _, _, _ = both("qwen2_5_vl", types, None, images, videos)
    video = types[0] == 2
    assert t2[0, video, 0].unique().tolist() == list(range(2, 10))  # frame k at 2 + k
    assert t25[0, video, 0].unique().tolist() == [2 + 2 * k for k in range(8)]  # 0.5 s/frame * 4 tokens/s


def test_text_advance_rules_are_explicit():
    """transformers >= 5.3 continues text after a video at max(h, w) (time ignored); 4.x after its largest position."""
    types, _, images, videos = batch([SCENARIOS["video_more_frames_than_hw"]], "qwen2_vl")
    new, _, _, _ = both("qwen2_vl", types, None, images, videos, text_advance="max_hw")
    old, _ = recipes.qwen_vl_positions(types, video_grid_thw=videos, spatial_merge_size=MERGE,
                                       text_advance="max_position")
    text_after = torch.arange(types.shape[1]) >= types.shape[1] - 3
    assert new[0, text_after, 0].tolist() == [4, 5, 6]  # 2 + max(2, 2): overlaps the video's frames 2..9
    assert old[0, text_after, 0].tolist() == [10, 11, 12]  # 2 + max(8, 2, 2): after the last frame
    assert torch.equal(new[0, ~text_after], old[0, ~text_after])


@pytest.mark.filterwarnings("error::FutureWarning")  # a deprecated transformers argument breaks on upgrade
@pytest.mark.parametrize("version", list(CONFIGS))
def test_decode_offset_matches_transformers(version):
    prompts = [SCENARIOS["video_then_image"], [4, ("image", (1, 8, 4)), 7]]
    types, mask, images, videos = batch(prompts, version)
    _, deltas, _, their_deltas = both(version, types, mask, images, videos)
    model, _ = peer(version)
    model.rope_deltas = their_deltas[:, None]
    length = types.shape[1]
    cache = SimpleNamespace(get_seq_length=lambda: length)
    # decoding with a cache and no mask: transformers counts the cache length (its argument `past_key_values` is
    # `cache` in newer releases, which deprecate the old name)
    parameters = inspect.signature(model.compute_3d_position_ids).parameters
    cache_arg = {"cache" if "cache" in parameters else "past_key_values": cache}
    theirs = model.compute_3d_position_ids(input_ids=None, inputs_embeds=torch.zeros(2, 3, 8), image_grid_thw=None,
                                           video_grid_thw=None, attention_mask=None, **cache_arg)
    assert torch.equal(recipes.qwen_vl_decode_positions(deltas, length, 3), theirs.permute(1, 2, 0))
    # counted without padding, the new tokens sit where get_rope_index puts text appended to each prompt
    unpadded = mask.sum(-1)
    longer = batch([p[:-1] + [p[-1] + 3] for p in prompts], version)
    full, _, _, _ = both(version, *longer)
    appended = torch.stack([full[b, longer[1][b].bool()][-3:] for b in range(2)])
    assert torch.equal(recipes.qwen_vl_decode_positions(deltas, unpadded, 3), appended)


def mrope_case(version):
    _, config = CONFIGS[version]
    text = config.text_config
    module = (Qwen3VLTextRotaryEmbedding if version == "qwen3_vl" else Qwen2VLRotaryEmbedding)(text)
    section = text.rope_parameters["mrope_section"]
    theta = text.rope_parameters["rope_theta"]
    interleaved = version == "qwen3_vl"
    ours = recipes.mrope(32, section, theta=theta, interleaved=interleaved)
    same = recipes.mrope(32, section, interleaved=interleaved,
                         ladder=recipes.RopeRecipe(module.inv_freq.double()[None]))
    return module, ours, same


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen3_vl"])
def test_mrope_frequencies_match_the_rotary_module(version):
    module, ours, same = mrope_case(version)
    freq_rel = max_rel(ours.freqs, same.freqs)
    assert freq_rel <= F32_FREQ_RTOL
    # positions from a real prompt, plus random distinct per-axis positions, through the module's recomposition
    types, mask, images, videos = batch([SCENARIOS["video_then_image"], SCENARIOS["two_images"]], version)
    positions, _, _, _ = both(version, types, mask, images, videos)
    random = torch.randint(0, 500, positions.shape, generator=torch.Generator().manual_seed(0))
    for pos in (positions, random):
        per_axis = pos.permute(2, 0, 1)[..., None].double() * module.inv_freq.double()  # (3, B, N, P)
        theirs = module.recomposition_frequencies(per_axis)[..., : ours.freqs.shape[-1]]
        f64 = max_abs(same.angles(pos.double()), theirs)
        assert f64 <= F64_TOL, f"{version}: float64 angles differ by {f64:.2e}"
    # float32 end to end: the module's cos/sin and apply_rotary_pos_emb vs ndrope, both against a float64 oracle
    q = torch.randn(2, 2, positions.shape[1], 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pos = positions * 37  # larger positions, where float32 angles start to matter
    heads = pos[:, None]  # (B, 1, N, 3): angles (B, 1, N, P) broadcast over the heads of q (B, H, N, D)
    oracle = ndrope.apply_rotary(q, ours.rotation(heads.double()), layout="half")
    cos, sin = module(q.float(), pos.permute(2, 0, 1))
    peer32, _ = apply_rotary_pos_emb(q.float(), q.float(), cos, sin)
    ours32 = ndrope.apply_rotary(q.float(), ours.rotation(heads), layout=ours.layout)
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(version, err_ours, err_peer, q, 1e-3)
    report(f"mrope_{version}", freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_transformers=err_peer)


def test_mrope_is_a_section_of_one_ladder_not_three_ladders():
    f = recipes.mrope(128, (16, 24, 24)).freqs
    ladder = recipes.standard(128, theta=1e6).freqs[0]
    assert torch.equal(f.sum(0), ladder) and ((f != 0).sum(0) == 1).all()
    text = torch.arange(34.0)[:, None].expand(-1, 3)  # text: all axes equal -> plain 1D RoPE
    assert max_abs(recipes.mrope(128, (16, 24, 24)).angles(text.double()), text[:, :1].double() * ladder) == 0


def test_video_temporal_bands():
    videorope = recipes.video_temporal_bands(32, 4)
    ladder = recipes.standard(32, theta=1e6).freqs[0]
    assert torch.equal(videorope.freqs.sum(0), ladder)
    assert (videorope.freqs[0, :-4] == 0).all() and torch.equal(videorope.freqs[0, -4:], ladder[-4:])  # t: slowest
    assert torch.equal(videorope.freqs[1, 0:12:2], ladder[0:12:2])  # h, w alternate on the fast pairs
    assert torch.equal(videorope.freqs[2, 1:12:2], ladder[1:12:2])
    hope = recipes.video_temporal_bands(32, 4, zero_temporal=True)
    frames = torch.tensor([[0.0, 3, 5], [9.0, 3, 5]], dtype=torch.float64)
    a = hope.angles(frames)
    assert torch.equal(a[0], a[1])  # HoPE: the time coordinate does not rotate anything
    assert (hope.freqs[0] == 0).all() and torch.equal(hope.freqs[:, -4:], torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: recipes.mrope(32, (4, 6, 7)), "mrope_section"),
        (lambda: recipes.qwen_vl_positions(torch.tensor([[0, 1, 1]]), image_grid_thw=[[1, 2, 2]]), "does not match"),
        (lambda: recipes.qwen_vl_positions(torch.tensor([[0, 1, 1, 1, 1]])), "image_grid_thw"),
        (lambda: recipes.qwen_vl_positions(torch.tensor([[0]]), version="qwen4"), "version"),
        (lambda: recipes.qwen_vl_positions(torch.tensor([[0]]), text_advance="max_t"), "text_advance"),
        (lambda: recipes.video_temporal_bands(32, 17), "temporal_pairs"),
    ],
)
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()
