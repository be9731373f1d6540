"""Language-model recipes against transformers' own rope code (``modeling_rope_utils`` + GPT-NeoX's rotary module).

Per case: (1) our float64 frequencies equal transformers' float32 ones to float32 rounding, and the attention
scale is the same number; (2) in float64, with transformers' frequencies, our rotation equals transformers'
``apply_rotary_pos_emb`` to 1e-12; (3) end to end in float32 against a float64 oracle, our error is no larger
than transformers' own float32 module's.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from recipe_parity import F32_FREQ_RTOL, F64_TOL, assert_no_worse_than_peer, max_abs, max_rel, report

import ndrope
from ndrope import recipes

# 5.18: the first release whose rope API these tests call, with Qwen2.5-VL time steps not truncated to int (5.17)
transformers = pytest.importorskip("transformers", minversion="5.18")
from transformers import GPTNeoXConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

HEAD_DIM = 32
SHORT = [1.0 + 0.1 * j for j in range(HEAD_DIM // 4)]
LONG = [1.5 + 0.7 * j for j in range(HEAD_DIM // 4)]

# name: (rope_parameters, max_position_embeddings, sequence length, our recipe)
CASES = {
    "standard": ({"rope_type": "default", "rope_theta": 10000.0}, 64, 48, lambda: recipes.standard(HEAD_DIM)),
    "standard_partial": (
        {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}, 64, 48,
        lambda: recipes.standard(HEAD_DIM, theta=500.0, partial_rotary_factor=0.5),
    ),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}, 64, 48,
               lambda: recipes.linear(HEAD_DIM, factor=3.0)),
    "dynamic_ntk": (
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.75}, 64, 150,
        lambda: recipes.dynamic_ntk(HEAD_DIM, factor=2.0, max_position_embeddings=64, seq_len=150,
                                    partial_rotary_factor=0.75),
    ),
    "yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}, 256, 200,
        lambda: recipes.yarn(HEAD_DIM, factor=4.0, original_max_position_embeddings=64),
    ),
    "yarn_mscale_untruncated": (
        {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "original_max_position_embeddings": 32,
         "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
        256, 200,
        lambda: recipes.yarn(HEAD_DIM, factor=8.0, original_max_position_embeddings=32, theta=5000.0, mscale=0.707,
                             mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0, truncate=False),
    ),
    "yarn_factor_from_lengths_attention_factor": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "original_max_position_embeddings": 64,
         "attention_factor": 1.3, "partial_rotary_factor": 0.5},
        256, 100,
        lambda: recipes.yarn(HEAD_DIM, factor=None, original_max_position_embeddings=64, max_position_embeddings=256,
                             attention_factor=1.3, partial_rotary_factor=0.5),
    ),
    "llama3": (
        {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        512, 300,
        lambda: recipes.llama3(HEAD_DIM, factor=8.0, original_max_position_embeddings=64, theta=10000.0),
    ),
    "longrope_short": (
        {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
         "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
        256, 50,
        lambda: recipes.longrope(HEAD_DIM, short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=64,
                                 max_position_embeddings=256, seq_len=50, partial_rotary_factor=0.5),
    ),
    "longrope_long": (
        {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
         "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
        256, 200,
        lambda: recipes.longrope(HEAD_DIM, short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=64,
                                 max_position_embeddings=256, seq_len=200, partial_rotary_factor=0.5),
    ),
    "p_rope": (
        {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "factor": 2.0}, 64, 48,
        lambda: recipes.p_rope(HEAD_DIM, 0.25, factor=2.0),
    ),
}


def config(parameters: dict, max_positions: int) -> GPTNeoXConfig:
    # GPT-NeoX defaults to partial_rotary_factor 0.25 (rotary_pct); the cases say 1.0 unless they set it
    parameters = {"partial_rotary_factor": 1.0, **parameters}
    return GPTNeoXConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, max_position_embeddings=max_positions,
                         rope_parameters=parameters)


def peer_frequencies(parameters: dict, max_positions: int, seq_len: int) -> tuple[torch.Tensor, float]:
    cfg = config(parameters, max_positions)
    if parameters["rope_type"] == "default":
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[parameters["rope_type"]](cfg, None, seq_len=seq_len)


def peer_rotate(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, scale: float, positions: torch.Tensor):
    """transformers' own rotation (GPT-NeoX's forward math, any dtype): cos/sin of cat(freqs, freqs) times the scale."""
    angles = positions[:, None].to(freqs) * freqs
    emb = torch.cat((angles, angles), dim=-1)[None]  # (1, N, D): apply_rotary_pos_emb unsqueezes heads
    return apply_rotary_pos_emb(q, k, emb.cos() * scale, emb.sin() * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_language_recipe_matches_transformers(name):
    parameters, max_positions, seq_len, make = CASES[name]
    recipe = make()
    peer_inv, peer_scale = peer_frequencies(parameters, max_positions, seq_len)
    assert recipe.freqs.shape == (1, peer_inv.numel()), (recipe.freqs.shape, peer_inv.shape)
    freq_rel = max_rel(recipe.freqs[0], peer_inv)
    assert freq_rel <= F32_FREQ_RTOL, f"{name}: frequencies differ from transformers by {freq_rel:.2e} (relative)"
    assert math.isclose(recipe.attention_scale, peer_scale, rel_tol=1e-15), (recipe.attention_scale, peer_scale)

    # (2) float64, equal frequencies: our positions, layout and scale against transformers' apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, seq_len, HEAD_DIM, generator=gen, dtype=torch.float64)
    positions = torch.arange(seq_len)
    same = dataclasses.replace(recipe, freqs=peer_inv.double()[None])
    ours = ndrope.apply_rotary(q, same.rotation(same.positions(seq_len, dtype=torch.float64)), layout=same.layout)
    theirs, _ = peer_rotate(q, k, peer_inv.double(), peer_scale, positions)
    f64 = max_abs(ours, theirs)
    assert f64 <= F64_TOL, f"{name}: float64 rotation differs by {f64:.2e}"

    # (3) float32 end to end against the float64 oracle of our recipe
    oracle, _ = peer_rotate(q, k, recipe.freqs[0], recipe.attention_scale, positions)
    module = GPTNeoXRotaryEmbedding(config(parameters, max_positions))
    q32 = q.float()
    cos, sin = module(q32, positions[None])
    peer32, _ = apply_rotary_pos_emb(q32, q32, cos, sin)
    ours32 = ndrope.apply_rotary(q32, recipe.rotation(recipe.positions(seq_len, dtype=torch.float32)),
                                 layout=recipe.layout)
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(name, err_ours, err_peer, q, 1e-3)
    report(name, freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_transformers=err_peer)


def test_yarn_ramp_blends_between_the_two_ladders():
    recipe = recipes.yarn(64, factor=4.0, original_max_position_embeddings=4096)
    base = recipes.standard(64).freqs[0]
    assert torch.equal(recipe.freqs[0, :2], base[:2])  # fastest pairs extrapolate
    torch.testing.assert_close(recipe.freqs[0, -2:], base[-2:] / 4, rtol=1e-15, atol=0)  # slowest interpolate
    assert recipe.attention_scale == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_attention_scale_multiplies_the_rotated_channels_only():
    recipe = recipes.yarn(16, factor=4.0, original_max_position_embeddings=8, partial_rotary_factor=0.5)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    out = ndrope.apply_rotary(x, recipe.rotation(recipe.positions(5)), layout=recipe.layout)
    assert torch.equal(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1) * recipe.attention_scale)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: recipes.standard(32, partial_rotary_factor=1.5), "partial_rotary_factor"),
        (lambda: recipes.yarn(32, factor=None, original_max_position_embeddings=64), "max_position_embeddings"),
        (lambda: recipes.longrope(32, short_factor=[1.0] * 3, long_factor=[1.0] * 16,
                                  original_max_position_embeddings=64, factor=2.0), "short_factor"),
        (lambda: recipes.p_rope(32, 1.5), "fraction"),
        (lambda: recipes.llama3(32, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
    ],
)
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_readme_recipes_example_runs():
    """The README's "Coming from another RoPE" block runs as written and gives the shapes its comments state."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "from ndrope import recipes" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["q"].shape == (1, 8, 1024, 64)
    assert namespace["rotation"][0].shape == (1024, 32)
    assert namespace["positions"].shape == (1, 13, 3) and namespace["deltas"].shape == (1,)
    assert namespace["cos"].shape == (1, 1, 13, 64)
    assert namespace["patches"].shape == (196, 2)
