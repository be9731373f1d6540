"""Attention and block that *apply* position tables handed to them; they never build grids.

`RopeAttention` is timm's `Attention` (same parameters, same state-dict keys, so plain timm ViT
checkpoints load) whose forward also takes a rotation ``rope`` for q and k and an additive logit
bias ``attn_mask``. The model computes both once per forward (`NDRopeVisionTransformer`) and
passes them to every block, as timm's Eva does.

Shape alphabet: B batch, H heads, N tokens (prefix + patches), D channels per head, P = D // 2 pairs.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

import ndrope
from ndrope.functional import Rotation

#: Channel pairing of the rotation, shared by the tables (`ndrope.RotaryEmbedding`) and this layer.
#: "half" pairs channel j with j + D/2 (GPT-NeoX, Llama in transformers); for models trained from
#: scratch the choice is a fixed permutation of channels and does not change what can be learned.
ROPE_LAYOUT: ndrope.Layout = "half"


class RopeAttention(Attention):
    """Multi-head self-attention with an optional RoPE rotation of q, k and an additive logit bias.

    ``fused_attn`` (from timm, on by default) selects `F.scaled_dot_product_attention`, so fast
    kernels apply on GPU; the plain matmul path next to it computes the same thing and is the
    reference the fused path is tested against.
    """

    def project_qkv(self, x: Tensor, rope: Rotation | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, N, D) from x (B, N, C); q and k rotated by ``rope`` when given.

        ``rope`` is a (cos, sin) pair (or angles), each broadcastable to (B, H, N, P): (N, P) shared
        by all heads, (H, N, P) per head, (B, 1 or H, N, P) per sample. Rows of zero angles leave
        their token unrotated, which is how the class and register tokens are exempted.
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, H, N, D
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = ndrope.apply_rotary(q, rope, layout=ROPE_LAYOUT)
            k = ndrope.apply_rotary(k, rope, layout=ROPE_LAYOUT)
        return q, k, v

    def forward(self, x: Tensor, rope: Rotation | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, N, C) -> (B, N, C).

        Args:
            rope: rotation for q and k, see `project_qkv`.
            attn_mask: additive float bias on the scaled logits, broadcastable to (B, H, N, N)
                (ALiBi, key masks as -inf); cast to the dtype of q, as SDPA requires.
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.project_qkv(x, rope)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B, H, N, N
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class RopeBlock(Block):
    """timm's pre-norm `Block` whose attention receives the per-forward ``rope`` and ``attn_mask``.

    Build it with ``attn_layer=RopeAttention`` (or a subclass); `NDRopeVisionTransformer` does.
    """

    def forward(self, x: Tensor, rope: Rotation | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, N, C) -> (B, N, C); ``rope`` and ``attn_mask`` as in `RopeAttention.forward`."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
