"""Attention and block that *apply* position tables handed to them; they never build grids.

`RopeAttention` has the parameters and state-dict keys of timm's `Attention` (plain timm ViT
checkpoints load), and its forward also takes a rotation ``rope`` for q and k beside timm's
``attn_mask`` and ``is_causal``. `NDRopeVisionTransformer` computes the rotation, the bias and the
logit scale once per forward and passes them to every block, as timm's Eva does.

Shape alphabet: B batch, H heads, N tokens (prefix + patches), D channels per head, P = D // 2 pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from timm.models.vision_transformer import Block
from torch import Tensor, nn

import ndrope
from ndrope.functional import Rotation

#: Channel pairing of the rotation, shared by the tables (`ndrope.RotaryEmbedding`) and this layer.
#: "half" pairs channel j with j + D/2 (GPT-NeoX, Llama in transformers); for models trained from
#: scratch the choice is a fixed permutation of channels and does not change what can be learned.
ROPE_LAYOUT: ndrope.Layout = "half"
#: ``attn_logit_scale`` of `NDRopeVisionTransformer`: ``"none"``, or ``"log-length"``, the attention logits
#: of a sequence of n tokens times ``log(n) / log(n_train)`` (`log_length_scale`).
AttnLogitScale = Literal["none", "log-length"]
#: Every accepted ``attn_logit_scale`` value.
ATTN_LOGIT_SCALE_CHOICES: tuple[str, ...] = get_args(AttnLogitScale)


def log_length_scale(num_tokens: int, reference_tokens: int) -> float:
    """``log(num_tokens) / log(reference_tokens)``: the factor on the attention logits that keeps the
    entropy of attention over ``num_tokens`` keys near its value over the ``reference_tokens`` keys of
    training (1 at the reference; > 1 sharpens attention over a longer sequence, < 1 softens it over a
    shorter one).

    Su's log-n scaling of attention ("entropy invariance", https://kexue.fm/archives/8823), as in
    Chiang & Cholak 2022 (https://arxiv.org/abs/2202.12172: logits times log n) and Scalable-Softmax
    (Nakanishi 2025, https://arxiv.org/abs/2501.19399: q times s log n), and the idea behind YaRN's
    attention factor (Peng et al. 2023, https://arxiv.org/abs/2309.00071). Divided by the training
    value, as here, it is the identity at the training length and needs no retraining. n counts every key a query attends to,
    prefix tokens (class, registers) included: the softmax normalises over all of them.
    """
    if reference_tokens < 2:
        raise ValueError(f"reference_tokens={reference_tokens} must be >= 2: log(1) = 0 cannot be a reference length")
    # log2, not log: torch.compile(dynamic=True) keeps it symbolic in the length instead of recompiling per length
    return math.log2(num_tokens) / math.log2(reference_tokens)


class BlockInputs(NamedTuple):
    """What every block of a model takes, computed once per forward (by `NDRopeVisionTransformer`, or
    packed by `vit.packing`); the blocks only apply it."""

    tokens: Tensor  # B, N, C: k prefix tokens + patches (packed: rows of several images)
    ropes: list[Rotation | None]  # the rotation of each block, (cos, sin) broadcastable to (B, H, N, P)
    bias: Tensor | None  # additive logit bias broadcastable to (B, H, N, N): ALiBi, masks
    logit_scale: float | Tensor | None  # factor on the logits: a number, or (B, 1, N, 1), one per query


class RopeAttention(nn.Module):
    """Multi-head self-attention with an optional RoPE rotation of q, k and an additive logit bias.

    The constructor takes what timm's `Block` passes to its ``attn_layer``. ``fused_attn`` (timm's
    global default, on unless disabled) selects `F.scaled_dot_product_attention`, so fast kernels
    apply on GPU; the plain matmul path next to it computes the same thing and is the reference the
    fused path is tested against.

    Args:
        dim: C, token channels; D = C // num_heads.
        qkv_bias, proj_bias: biases of the projections.
        qk_norm: ``norm_layer`` over D on q and k; scale_norm: ``norm_layer`` over C before the output projection.
        attn_drop, proj_drop: dropout on the attention weights and after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm=True or scale_norm=True needs a norm_layer")
        dd = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor, rope: Rotation | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, N, D) from x (B, N, C); q and k rotated by ``rope`` when given.

        ``rope`` is a (cos, sin) pair (or angles), each broadcastable to (B, H, N, P): (N, P) shared
        by all heads, (H, N, P) per head, (B, 1 or H, N, P) per sample. Rows of zero angles leave
        their token unrotated, which is how the class and register tokens are exempted.
        """
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # B, H, N, D each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = ndrope.apply_rotary_pair(q, k, rope, layout=ROPE_LAYOUT)  # one launch on CUDA
        return q, k, v

    def forward(
        self,
        x: Tensor,
        rope: Rotation | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        logit_scale: float | Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C) -> (B, N, C).

        Args:
            rope: rotation for q and k, see `project_qkv`.
            attn_mask: broadcastable to (B, H, N, N): an additive float bias on the scaled logits
                (ALiBi, -inf for hidden keys; cast to the dtype of q, as SDPA requires), or bool
                (True = may attend).
            is_causal: token i attends to tokens 0..i only (combined with ``attn_mask``).
            logit_scale: a factor on the logits ``q k^T / sqrt(D)`` of every query (not on
                ``attn_mask``), a number or a tensor broadcastable to (B, H, N, 1) (one per query);
                applied to q after the rotation, so the fused and the matmul paths scale alike.
        """
        B, N, C = x.shape
        q, k, v = self.project_qkv(x, rope)
        if logit_scale is not None:  # at the scale's precision (as a Python number would be), then q's dtype
            q = (q * logit_scale).to(q.dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # True = may attend
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        if is_causal and (attn_mask is not None or not self.fused_attn):  # SDPA takes a mask or is_causal, not both
            causal = torch.full((N, N), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            attn_mask, is_causal = causal if attn_mask is None else attn_mask + causal, False
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B, H, N, N
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


class RopeBlock(Block):
    """timm's pre-norm `Block` whose attention receives the per-forward ``rope`` and ``attn_mask``.

    Takes timm's `Block` arguments; ``attn_layer`` defaults to `RopeAttention` (or give a subclass).
    """

    def __init__(self, *args: Any, attn_layer: type[RopeAttention] = RopeAttention, **kwargs: Any) -> None:
        super().__init__(*args, attn_layer=attn_layer, **kwargs)

    def forward(
        self,
        x: Tensor,
        rope: Rotation | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        logit_scale: float | Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C) -> (B, N, C); ``rope``, ``attn_mask``, ``is_causal`` and ``logit_scale`` as in
        `RopeAttention.forward`."""
        attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal, logit_scale=logit_scale)
        x = x + self.drop_path1(self.ls1(attn))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
