"""`ndrope.integrations.transformers.patch` on the real transformers classes, from tiny configs built in code.

Per model: the patched model's outputs equal the original's to float32 rounding, far below RoPE's own effect
(the original without RoPE), and no further from a float64 run than the original's; greedy generation with the
KV cache gives the same tokens; gradients match; the q/k rotation runs as ``ndrope::rotate``. Then: only the
patched instance changes, ``recipe=`` puts other schemes in with the checkpoint still loading, and bad input
leaves the model untouched.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config here

import pytest
import torch
from integration_parity import assert_gradients_match, assert_same_model, rotations, zero_inv_freq
from recipe_parity import max_abs

import ndrope
from ndrope import recipes

# 5.17: the oldest release patch supports (ndrope.integrations.transformers.MIN_VERSION)
transformers = pytest.importorskip("transformers", minversion="5.17")
from transformers import (  # noqa: E402
    DINOv3ViTConfig,
    DINOv3ViTModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PixtralVisionConfig,
    PixtralVisionModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.llama import modeling_llama  # noqa: E402

from ndrope.integrations import transformers as integration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97
# a larger init than transformers' 0.02 gives attention logits of order 1, where RoPE visibly matters
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, initializer_range=0.2)
SHORT = [1.0 + 0.1 * j for j in range(8)]
LONG = [1.5 + 0.7 * j for j in range(8)]
# every rope_type of transformers (max_position_embeddings 32; the 40-token sequence passes it)
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "proportional": {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def seeded(make):
    torch.manual_seed(0)
    return make().eval()


def llama(rope_type: str = "default") -> LlamaForCausalLM:
    config = LlamaConfig(**TEXT, max_position_embeddings=32, rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    return seeded(lambda: LlamaForCausalLM(config))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def float64(model):
    return copy.deepcopy(model).double()


def greedy(model, **inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)


# --------------------------------------------------------------------------------------------------------------
# language models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_llama_every_rope_type_keeps_outputs_and_generation(rope_type):
    original = llama(rope_type)
    patched = integration.patch(copy.deepcopy(original))
    ids = tokens(2, 40)
    with torch.no_grad():
        out, ours = original(ids).logits, patched(ids).logits
        no_rope = original(ids, position_ids=torch.zeros_like(ids)).logits
        oracle = float64(patched)(ids).logits
    assert_same_model(f"transformers:llama_{rope_type}", original=out, patched=ours, no_rope=no_rope, oracle=oracle)
    # 12 prompt tokens + 12 generated: crosses longrope's 16 and, with the cache, dynamic's growth past 32 - 10
    prompt = tokens(2, 12, seed=2)
    mask = torch.ones_like(prompt)
    assert torch.equal(greedy(original, input_ids=prompt, attention_mask=mask),
                       greedy(patched, input_ids=prompt, attention_mask=mask))


def test_llama_rotation_runs_as_ndrope_rotate_in_every_layer():
    original = llama()
    patched = integration.patch(copy.deepcopy(original))
    ids = tokens(1, 8)
    assert rotations(lambda: patched(ids)) == 2 * original.config.num_hidden_layers  # q and k, each layer
    assert rotations(lambda: original(ids)) == 0


@pytest.mark.slow
def test_llama_patched_compiles_with_fullgraph():
    patched = integration.patch(llama())
    ids = tokens(1, 16)
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert max_abs(compiled(ids).logits, patched(ids).logits) <= 1e-6


def test_llama_left_padded_batch_generates_as_the_original():
    original = llama("yarn")
    patched = integration.patch(copy.deepcopy(original))
    prompt = tokens(2, 10, seed=3)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0  # left padding: transformers' position ids skip it
    assert torch.equal(greedy(original, input_ids=prompt, attention_mask=mask),
                       greedy(patched, input_ids=prompt, attention_mask=mask))


def test_llama_gradients_match_in_training():
    original = llama("yarn").train()
    patched = integration.patch(copy.deepcopy(original))
    ids = tokens(2, 24)
    for model in (original, patched):
        model(ids, labels=ids).loss.backward()
    assert_gradients_match(original, patched)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_llama_family_keeps_outputs(family):
    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    config = config_cls(**TEXT, max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                             "factor": 2.0, "original_max_position_embeddings": 32})
    original = seeded(lambda: model_cls(config))
    patched = integration.patch(copy.deepcopy(original))
    ids = tokens(2, 24)
    with torch.no_grad():
        out, ours = original(ids).logits, patched(ids).logits
        no_rope = original(ids, position_ids=torch.zeros_like(ids)).logits
    assert_same_model(f"transformers:{family}_yarn", original=out, patched=ours, no_rope=no_rope)


def gemma3() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        **{**TEXT, "num_hidden_layers": 4}, max_position_embeddings=64, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}},
    )
    return seeded(lambda: Gemma3ForCausalLM(config))


def test_gemma3_a_theta_per_layer_type():
    original = gemma3()
    patched = integration.patch(copy.deepcopy(original))
    rotary = patched.model.rotary_emb
    assert isinstance(rotary, integration.LayerTypeRotaryEmbedding)
    assert torch.equal(rotary.by_type["full_attention"].rope.freqs, recipes.linear(16, factor=8.0, theta=1e6).freqs)
    ids = tokens(2, 20)
    with torch.no_grad():
        out, ours = original(ids).logits, patched(ids).logits
        no_rope = original(ids, position_ids=torch.zeros_like(ids)).logits
        oracle = float64(patched)(ids).logits
    assert_same_model("transformers:gemma3", original=out, patched=ours, no_rope=no_rope, oracle=oracle)
    prompt = tokens(2, 6, seed=2)
    mask = torch.ones_like(prompt)
    assert torch.equal(greedy(original, input_ids=prompt, attention_mask=mask),
                       greedy(patched, input_ids=prompt, attention_mask=mask))


# --------------------------------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL: text M-RoPE, get_rope_index, vision towers
# --------------------------------------------------------------------------------------------------------------

IMAGE, VIDEO, VISION_START = 90, 91, 92
VISION = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, dict(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config={**VISION, "embed_dim": 32, "hidden_size": 64})),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, dict(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config={**VISION, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "window_size": 16,
                       "fullatt_block_indexes": [1], "tokens_per_second": 2})),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, dict(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [3, 3, 2],
                                                 "mrope_interleaved": True}},
        vision_config={**VISION, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64,
                       "num_position_embeddings": 16, "deepstack_visual_indexes": [0]})),
}


def qwen(version: str):
    config_cls, model_cls, kwargs = QWEN[version]
    config = config_cls(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, **kwargs)
    model = seeded(lambda: model_cls(config))
    with torch.no_grad():  # the larger init of TEXT for every matrix (the composite model inits with its own 0.02)
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2, generator=generator)
    return model


def qwen_inputs(batch: int = 2):
    """Text, an 8x12-patch image (24 tokens after the 2x2 merge), text; the first sequence left-padded."""
    grid = torch.tensor([[1, 8, 12]] * batch)
    rows = []
    for b in range(batch):
        head = tokens(1, 3 + 2 * b, seed=10 + b)[0] % 80
        rows.append(torch.cat([head, torch.tensor([VISION_START] + [IMAGE] * 24), tokens(1, 5, seed=20 + b)[0] % 80]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):], mask[b, length - len(row):] = row, 1
    pixels = torch.randn(batch * 96, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(5))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                mm_token_type_ids=(ids == IMAGE).long())


@pytest.mark.parametrize("version", list(QWEN))
def test_qwen_vl_keeps_outputs_generation_and_rope_index(version):
    original = qwen(version)
    patched = integration.patch(copy.deepcopy(original))
    inputs = qwen_inputs()
    # get_rope_index is ndrope.recipes.qwen_vl_positions on the patched instance, and equal to transformers'
    index_args = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")}
    theirs, their_deltas = original.model.get_rope_index(**index_args)
    ours, our_deltas = patched.model.get_rope_index(**index_args)
    assert torch.equal(ours, theirs) and torch.equal(our_deltas, their_deltas)
    with torch.no_grad():
        out, mine = original(**inputs).logits, patched(**inputs).logits
        no_rope = zero_inv_freq(original)(**inputs).logits
        wide = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        oracle = float64(patched)(**wide).logits
    assert_same_model(f"transformers:{version}", original=out, patched=mine, no_rope=no_rope, oracle=oracle)
    assert torch.equal(greedy(original, **inputs), greedy(patched, **inputs))
    layers = original.config.text_config.num_hidden_layers + original.config.vision_config.depth
    assert rotations(lambda: patched(**inputs)) == 2 * layers


@pytest.mark.parametrize("version", list(QWEN))
def test_qwen_vl_vision_tower_alone_keeps_outputs_and_gradients(version):
    original = qwen(version).model.visual.train()
    patched = integration.patch(copy.deepcopy(original))
    inputs = qwen_inputs(batch=1)
    pixels, grid = inputs["pixel_values"][:96], inputs["image_grid_thw"]
    out, mine = original(pixels, grid_thw=grid).pooler_output, patched(pixels, grid_thw=grid).pooler_output
    with torch.no_grad():
        no_rope = zero_inv_freq(original)(pixels, grid_thw=grid).pooler_output
        oracle = float64(patched)(pixels.double(), grid_thw=grid).pooler_output
    assert_same_model(f"transformers:{version}_vision", original=out.detach(), patched=mine.detach(), no_rope=no_rope,
                      oracle=oracle)
    out.square().mean().backward()
    mine.square().mean().backward()
    assert_gradients_match(original, patched)


# --------------------------------------------------------------------------------------------------------------
# vision models: Pixtral, DINOv3
# --------------------------------------------------------------------------------------------------------------


def pixtral() -> PixtralVisionModel:
    config = PixtralVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                                 patch_size=8, image_size=64, initializer_range=0.2)
    return seeded(lambda: PixtralVisionModel(config))


def test_pixtral_keeps_outputs_for_images_of_two_sizes():
    original = pixtral()
    patched = integration.patch(copy.deepcopy(original))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[64, 48], [40, 64]])
    with torch.no_grad():
        out, ours = original(pixels, image_sizes=sizes).last_hidden_state, patched(pixels, image_sizes=sizes).last_hidden_state
        no_rope = zero_inv_freq(original)(pixels, image_sizes=sizes).last_hidden_state
        oracle = float64(patched)(pixels.double(), image_sizes=sizes).last_hidden_state
    assert_same_model("transformers:pixtral", original=out, patched=ours, no_rope=no_rope, oracle=oracle)
    # the obvious 2D RoPE (a ladder per axis) is not Pixtral's: it moves the output by about RoPE's own effect
    naive = integration.patch(copy.deepcopy(original), recipe=recipes.timm_axial(16, theta=10000.0, rotate_half=True))
    with torch.no_grad():
        assert max_abs(naive(pixels, image_sizes=sizes).last_hidden_state, out) > 1e3 * max_abs(ours, out)


def dinov3(registers: int = 2) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                             patch_size=8, image_size=32, num_register_tokens=registers, initializer_range=0.2)
    return seeded(lambda: DINOv3ViTModel(config))


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_dinov3_keeps_outputs_with_register_tokens(size):
    original = dinov3()
    patched = integration.patch(copy.deepcopy(original))
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ours = original(pixels).last_hidden_state, patched(pixels).last_hidden_state
        no_rope = zero_inv_freq(original)(pixels).last_hidden_state
        oracle = float64(patched)(pixels.double()).last_hidden_state
    assert_same_model(f"transformers:dinov3_{size[0]}x{size[1]}", original=out, patched=ours, no_rope=no_rope,
                      oracle=oracle)
    assert torch.equal(ours[:, 0], ours[:, 0])  # class token present: 1 + 2 registers + patches rows
    assert ours.shape[1] == 1 + 2 + (size[0] // 8) * (size[1] // 8)


def test_dinov3_trains_with_its_coordinate_augmentation():
    original = dinov3().train()
    patched = integration.patch(copy.deepcopy(original))
    assert patched.rope_embeddings.training and patched.rope_embeddings.rescale == 2.0  # DINOv3's default
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = patched(pixels).last_hidden_state
    with torch.no_grad():
        assert max_abs(first, patched(pixels).last_hidden_state) > 0  # a fresh draw per forward, as transformers'
    first.square().mean().backward()
    original(pixels).last_hidden_state.square().mean().backward()
    trained = {n for n, p in original.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in patched.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(p.grad).all() for n, p in patched.named_parameters() if n in trained)


# --------------------------------------------------------------------------------------------------------------
# per instance; other schemes; checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_only_the_patched_instance_changes():
    original = llama()
    other = copy.deepcopy(original)
    class_forward = modeling_llama.LlamaAttention.forward
    module_function = modeling_llama.apply_rotary_pos_emb
    ids = tokens(1, 12)
    with torch.no_grad():
        before = other(ids).logits
    integration.patch(original)
    assert modeling_llama.LlamaAttention.forward is class_forward
    assert modeling_llama.apply_rotary_pos_emb is module_function
    assert "forward" not in vars(other.model.layers[0].self_attn)
    assert isinstance(other.model.rotary_emb, modeling_llama.LlamaRotaryEmbedding)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, before)
    assert rotations(lambda: other(ids)) == 0 and rotations(lambda: original(ids)) == 4


def test_another_context_scaling_equals_transformers_with_that_config():
    """``recipe=`` YaRN in a default-RoPE Llama = transformers' own Llama configured with YaRN, same weights."""
    plain = llama("default")
    yarn_config = dict(ROPE_PARAMETERS["yarn"])
    reference = seeded(lambda: LlamaForCausalLM(LlamaConfig(**TEXT, max_position_embeddings=32,
                                                            rope_parameters=yarn_config)))
    reference.load_state_dict(plain.state_dict())
    patched = integration.patch(plain, recipe=recipes.yarn(16, factor=4.0, original_max_position_embeddings=8))
    assert patched.model.rotary_emb.rope.attention_scale == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())
    ids = tokens(2, 40)
    with torch.no_grad():
        assert max_abs(patched(ids).logits, reference(ids).logits) <= 1e-5


def test_learned_rope_mixed_in_a_dinov3_checkpoint_loads_and_trains():
    original = dinov3()
    checkpoint = original.state_dict()
    mixed = ndrope.RotaryEmbedding.mixed(16, 2, num_heads=4, generator=torch.Generator().manual_seed(0))
    patched = integration.patch(dinov3(), recipe=mixed)
    assert "rope_embeddings.rope.freqs" in patched.state_dict()
    initial = patched.rope_embeddings.rope.freqs.detach().clone()
    patched.load_state_dict(checkpoint)  # strict: the original checkpoint has no learned frequencies
    assert torch.equal(patched.rope_embeddings.rope.freqs, initial)
    assert torch.equal(patched.embeddings.patch_embeddings.weight, original.embeddings.patch_embeddings.weight)
    patched.train()(torch.randn(2, 3, 32, 32)).last_hidden_state.square().mean().backward()
    assert patched.rope_embeddings.rope.freqs.grad.abs().sum() > 0
    saved = patched.state_dict()
    again = integration.patch(dinov3(), recipe=ndrope.RotaryEmbedding.mixed(16, 2, num_heads=4))
    again.load_state_dict(saved)
    assert torch.equal(again.rope_embeddings.rope.freqs, patched.rope_embeddings.rope.freqs)


def test_learned_rope_mixed_in_a_qwen_vision_tower():
    tower = qwen("qwen2_5_vl").model.visual
    patched = integration.patch(tower, recipe=ndrope.RotaryEmbedding.mixed(16, 2, num_heads=2))
    inputs = qwen_inputs(batch=1)
    out = patched.train()(inputs["pixel_values"][:96], grid_thw=inputs["image_grid_thw"]).pooler_output
    out.square().mean().backward()
    assert patched.rotary_pos_emb.rope.freqs.grad.abs().sum() > 0


def test_fixed_schemes_keep_the_state_dict_unchanged():
    original = qwen("qwen2_vl")
    patched = integration.patch(copy.deepcopy(original))
    assert patched.state_dict().keys() == original.state_dict().keys()
    original.load_state_dict(patched.state_dict())  # and back


# --------------------------------------------------------------------------------------------------------------
# bad input: an error that names it, and the model untouched
# --------------------------------------------------------------------------------------------------------------


def unchanged(model, reference) -> bool:
    return (type(model.model.rotary_emb) is type(reference.model.rotary_emb)
            and all("forward" not in vars(layer.self_attn) for layer in model.model.layers))


def test_unknown_model_names_itself_and_what_is_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no rotary module.*Llama.*DINOv3"):
        integration.patch(model)


def test_unknown_rotary_module_names_its_class():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                             intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPTNeoXRotaryEmbedding.*Supported"):
        integration.patch(model)


def test_unknown_rope_type_is_refused_before_anything_changes():
    model = llama()
    model.config.rope_parameters["rope_type"] = "su"
    with pytest.raises(ValueError, match=r"rope_type='su'.*'llama3'"):
        integration.patch(model)
    assert unchanged(model, llama())


def test_config_values_patch_cannot_express_are_refused_before_anything_changes():
    # Llama's default rope ignores partial_rotary_factor (transformers rotates the whole head): ndrope's reading of the
    # config would rotate half of it, and patch says so instead of changing the model
    config = LlamaConfig(**TEXT, max_position_embeddings=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="8 rotated pairs but the recipe built from it has 4"):
        integration.patch(model)
    assert unchanged(model, llama())
    no_rope_type = gemma3()
    no_rope_type.config.rope_parameters["sliding_attention"] = None
    with pytest.raises(ValueError, match="layer type 'sliding_attention' has no rope_parameters"):
        integration.patch(no_rope_type)
    assert isinstance(no_rope_type.model.rotary_emb, type(gemma3().model.rotary_emb))


def test_patching_twice_is_a_clear_error():
    model = integration.patch(llama())
    with pytest.raises(ValueError, match="already patched"):
        integration.patch(model)


@pytest.mark.parametrize(
    "recipe, match",
    [
        (recipes.dinov3(16), "n_axes=2"),
        (recipes.standard(64), "a head has only 8"),
        ({"model.rotary": recipes.standard(16)}, r"not rotary modules.*model.rotary_emb"),
        (ndrope.RotaryEmbedding.mixed(16, 1, num_heads=4), "per-head"),
        (torch.zeros(1, 8), "RopeRecipe or ndrope.RotaryEmbedding"),
    ],
)
def test_a_scheme_that_does_not_fit_is_refused_before_anything_changes(recipe, match):
    model = llama()
    with pytest.raises((ValueError, TypeError), match=match):
        integration.patch(model, recipe=recipe)
    assert unchanged(model, llama())


def test_a_coordinate_law_cannot_go_where_the_model_hands_integer_positions():
    tower = pixtral()
    with pytest.raises(ValueError, match="integer positions"):
        integration.patch(tower, recipe=recipes.dinov3(16))


def test_several_rotary_modules_need_a_named_recipe():
    with pytest.raises(ValueError, match=r"rotary modules \['model.visual.rotary_pos_emb', 'model.language_model"):
        integration.patch(qwen("qwen2_vl"), recipe=recipes.standard(16))


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if marker in b)


def test_readme_examples_run():
    namespace: dict = {}
    exec(readme_block("ndrope_hf.patch(LlamaForCausalLM"), namespace)
    assert namespace["tokens"].shape == (1, 8)
    assert isinstance(namespace["model"].model.rotary_emb, integration.TextRotaryEmbedding)
    assert namespace["other"].model.rotary_emb.rope.freqs.shape == (1, 8)
    namespace = {}
    exec(readme_block("RotaryEmbedding.mixed(64, 2, num_heads=3)"), namespace)
    assert namespace["dino"].rope_embeddings.rope.learnable
    assert namespace["vit"](torch.randn(1, 3, 64, 96)).shape == (1, 1000)


def test_importing_the_integration_imports_no_model_library():
    code = "import sys, ndrope.integrations.transformers, ndrope.integrations.timm; print('transformers' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
