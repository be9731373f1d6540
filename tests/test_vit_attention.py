"""RopeAttention / RopeBlock: timm-compatible, fused == manual, rotation, bias and logit scale applied as given;
log_length_scale."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch.testing import assert_close

import ndrope
from vit import ROPE_LAYOUT, RopeAttention, RopeBlock, log_length_scale

param = pytest.mark.parametrize
DIM, HEADS, TOKENS = 48, 3, 17  # D = 16, P = 8


def rotation(per_head: bool, tokens: int = TOKENS, prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for a 4 x 4 grid after ``prefix`` unrotated tokens, shared or per head."""
    torch.manual_seed(5)
    if per_head:
        rope = ndrope.RotaryEmbedding.mixed(DIM // HEADS, 2, HEADS, layout=ROPE_LAYOUT)
    else:
        rope = ndrope.RotaryEmbedding(DIM // HEADS, 2, theta=100.0, layout=ROPE_LAYOUT)
    cos, sin = rope.rotation((4, 4), num_prefix_tokens=prefix)
    return cos.detach().double(), sin.detach().double()


def attention(cls=RopeAttention, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(DIM, num_heads=HEADS, qkv_bias=True, **kwargs).double().eval()


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, TOKENS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class TestRopeAttention:
    @param("qk_norm", [False, True])
    def test_without_positions_it_is_timm_attention(self, qk_norm):
        """Same parameters and state-dict keys; identical output when given nothing to apply."""
        ours = attention(qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
        theirs = attention(Attention, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
        theirs.load_state_dict(ours.state_dict())
        assert_close(ours(tokens()), theirs(tokens()), atol=1e-12, rtol=1e-12)

    @param("with_bias", [False, True])
    @param("per_head", [False, True])
    def test_fused_path_matches_manual_path(self, per_head, with_bias):
        module = attention()
        bias = -torch.rand(HEADS, TOKENS, TOKENS, dtype=torch.float64) if with_bias else None
        rope = rotation(per_head)
        fused = module(tokens(), rope=rope, attn_mask=bias)
        module.fused_attn = False
        manual = module(tokens(), rope=rope, attn_mask=bias)
        assert_close(fused, manual, atol=1e-10, rtol=1e-10)

    @param("per_head", [False, True])
    def test_rotation_is_the_ndrope_rotation_of_q_and_k(self, per_head):
        module = attention()
        rope = rotation(per_head)
        q, k, v = module.project_qkv(tokens())
        q_rot, k_rot, v_same = module.project_qkv(tokens(), rope)
        assert_close(q_rot, ndrope.apply_rotary(q, rope, layout=ROPE_LAYOUT), atol=0, rtol=0)
        assert_close(k_rot, ndrope.apply_rotary(k, rope, layout=ROPE_LAYOUT), atol=0, rtol=0)
        assert_close(v_same, v, atol=0, rtol=0)
        assert_close(q_rot[:, :, :1], q[:, :, :1], atol=0, rtol=0)  # the prefix token is not rotated
        assert (q_rot[:, :, 2:] - q[:, :, 2:]).abs().max() > 1e-3

    def test_bias_is_added_to_the_scaled_logits(self):
        """A -inf bias on every key but one makes each query copy that key's value."""
        module = attention()
        bias = torch.full((TOKENS, TOKENS), float("-inf"), dtype=torch.float64)
        bias[:, 4] = 0.0
        _, _, v = module.project_qkv(tokens())
        expected = v[:, :, 4:5].expand(-1, -1, TOKENS, -1).transpose(1, 2).reshape(2, TOKENS, DIM)
        assert_close(module(tokens(), attn_mask=bias), module.proj(expected), atol=1e-12, rtol=1e-12)

    @param("fused", [True, False])
    def test_causal_is_an_upper_triangular_mask(self, fused):
        module = attention()
        module.fused_attn = fused
        future = torch.full((TOKENS, TOKENS), float("-inf"), dtype=torch.float64).triu(1)
        bias = -torch.rand(HEADS, TOKENS, TOKENS, dtype=torch.float64)
        rope = rotation(False)
        assert_close(module(tokens(), rope=rope, is_causal=True), module(tokens(), rope=rope, attn_mask=future), atol=1e-12, rtol=1e-12)
        combined = module(tokens(), attn_mask=bias, is_causal=True)
        assert_close(combined, module(tokens(), attn_mask=bias + future), atol=1e-12, rtol=1e-12)

    @param("fused", [True, False])
    def test_bool_mask_means_may_attend(self, fused):
        module = attention()
        module.fused_attn = fused
        allowed = torch.rand(TOKENS, TOKENS, generator=torch.Generator().manual_seed(2)) > 0.3
        allowed.fill_diagonal_(True)
        additive = torch.zeros(TOKENS, TOKENS, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
        assert_close(module(tokens(), attn_mask=allowed), module(tokens(), attn_mask=additive), atol=1e-12, rtol=1e-12)

    def test_bias_follows_the_dtype_of_q(self):
        module = attention().float()
        bias = -torch.rand(HEADS, TOKENS, TOKENS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(tokens().float(), rope=tuple(t.float() for t in rotation(True)), attn_mask=bias)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


    @param("fused", [True, False])
    @param("per_query", [False, True])
    def test_logit_scale_multiplies_the_scaled_logits_not_the_bias(self, fused, per_query):
        """softmax(s * q k^T / sqrt(D) + bias) v, written out, for a number s or one s per query."""
        module = attention()
        module.fused_attn = fused
        rope, bias = rotation(True), -torch.rand(HEADS, TOKENS, TOKENS, dtype=torch.float64)
        scale = torch.linspace(0.5, 2.0, TOKENS, dtype=torch.float64)[:, None] if per_query else 1.7
        q, k, v = module.project_qkv(tokens(), rope)
        weights = (scale * (q @ k.transpose(-2, -1)) / math.sqrt(DIM // HEADS) + bias).softmax(-1)  # B, H, N, N
        expected = module.proj((weights @ v).transpose(1, 2).reshape(2, TOKENS, DIM))
        assert_close(module(tokens(), rope=rope, attn_mask=bias, logit_scale=scale), expected, atol=1e-12, rtol=1e-12)

    def test_logit_scale_follows_the_dtype_of_q(self):
        module = attention().float()
        scale = torch.full((1, 1, TOKENS, 1), 1.5, dtype=torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(tokens().float(), logit_scale=scale)
        assert out.dtype == torch.bfloat16


class TestLogLengthScale:
    def test_is_the_ratio_of_logarithms(self):
        assert log_length_scale(50, 50) == 1.0
        assert log_length_scale(82, 50) == pytest.approx(math.log(82) / math.log(50), rel=1e-15)
        assert log_length_scale(82, 50) > 1 > log_length_scale(26, 50)  # sharper over more keys, softer over fewer

    def test_a_one_token_reference_is_an_error(self):
        with pytest.raises(ValueError, match="reference_tokens=1 must be >= 2"):
            log_length_scale(10, 1)


class TestRopeBlock:
    def test_without_positions_it_is_timm_block(self):
        torch.manual_seed(0)
        ours = RopeBlock(DIM, HEADS, qkv_bias=True, attn_layer=RopeAttention).double().eval()
        theirs = Block(DIM, HEADS, qkv_bias=True).double().eval()
        theirs.load_state_dict(ours.state_dict())
        assert_close(ours(tokens()), theirs(tokens()), atol=1e-12, rtol=1e-12)

    def test_its_attention_is_rope_attention_by_default(self):
        assert isinstance(RopeBlock(DIM, HEADS).attn, RopeAttention)

    def test_passes_rotation_bias_and_logit_scale_to_its_attention(self):
        torch.manual_seed(0)
        block = RopeBlock(DIM, HEADS, attn_layer=RopeAttention).double().eval()
        rope, bias = rotation(True), -torch.rand(HEADS, TOKENS, TOKENS, dtype=torch.float64)
        x = tokens()
        attn_out = block.attn(block.norm1(x), rope=rope, attn_mask=bias, logit_scale=1.3)
        expected = x + attn_out
        expected = expected + block.mlp(block.norm2(expected))
        assert_close(block(x, rope=rope, attn_mask=bias, logit_scale=1.3), expected, atol=1e-12, rtol=1e-12)
        assert (block(x, rope=rope, attn_mask=bias) - expected).abs().max() > 1e-4
