"""The rotations ndrope is measured against, each fed the same angles in its own table format.

Every peer is built from angles (N, P) and a dtype, and returns ``apply(q, k) -> (q, k)``.
Tables are prepared outside the timed call, as a model would cache them (rotary-embedding-torch
takes angles and computes cos/sin inside its call, so that is part of its time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import ndrope

Apply = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Peer:
    name: str
    layout: str  # the ndrope layout whose result it reproduces
    make: Callable[[Tensor, torch.dtype], Apply]


def _copy(theta: Tensor, dtype: torch.dtype) -> Apply:
    """The bound: one elementwise pass that reads q, k once and writes them once."""
    return lambda q, k: (q * 1.5, k * 1.5)


def _ndrope(layout: str) -> Callable[[Tensor, torch.dtype], Apply]:
    def make(theta: Tensor, dtype: torch.dtype) -> Apply:
        cos_sin = ndrope.cos_sin(theta)
        return lambda q, k: (ndrope.apply_rotary(q, cos_sin, layout=layout), ndrope.apply_rotary(k, cos_sin, layout=layout))

    return make


def _complex(theta: Tensor, dtype: torch.dtype) -> Apply:
    """Meta's Llama form: interleaved pairs as complex numbers times polar(1, angle), in float32."""
    freqs_cis = torch.polar(torch.ones_like(theta), theta)

    def rotate(x: Tensor) -> Tensor:
        x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_complex * freqs_cis).flatten(-2).type_as(x)

    return lambda q, k: (rotate(q), rotate(k))


def _timm(theta: Tensor, dtype: torch.dtype) -> Apply:
    from timm.layers import apply_rot_embed_cat

    # timm's RotaryEmbeddingCat table: [sin | cos], each repeated per pair member, float32
    emb = torch.cat((theta.sin().repeat_interleave(2, -1), theta.cos().repeat_interleave(2, -1)), dim=-1)
    return lambda q, k: (apply_rot_embed_cat(q, emb), apply_rot_embed_cat(k, emb))


def _rotary_embedding_torch(theta: Tensor, dtype: torch.dtype) -> Apply:
    from rotary_embedding_torch import apply_rotary_emb

    freqs = theta.repeat_interleave(2, -1)  # the library's (N, D) angle table
    return lambda q, k: (apply_rotary_emb(freqs, q), apply_rotary_emb(freqs, k))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_formula(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, tables in x's dtype."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half_tables(theta: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    emb = torch.cat((theta, theta), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _transformers(theta: Tensor, dtype: torch.dtype) -> Apply:
    cos, sin = _rotate_half_tables(theta, dtype)
    return lambda q, k: _rotate_half_formula(q, k, cos, sin)


def _compiled(theta: Tensor, dtype: torch.dtype) -> Apply:
    cos, sin = _rotate_half_tables(theta, dtype)
    torch.compiler.reset()  # a fresh cache per workload: the recompile limit (8) must not send it to eager
    compiled = torch.compile(_rotate_half_formula, dynamic=False)
    return lambda q, k: compiled(q, k, cos, sin)


COPY = Peer("copy bound (q * 1.5, k * 1.5)", "-", _copy)
#: ndrope's `apply_rotary` (the registered op; the C++ kernel on CPU when it builds)
NDROPE = (
    Peer("ndrope half", "half", _ndrope("half")),
    Peer("ndrope interleaved", "interleaved", _ndrope("interleaved")),
)
COMPLEX = Peer("complex (view_as_complex)", "interleaved", _complex)
COMPILED = Peer("torch.compile(rotate_half)", "half", _compiled)
PEERS = (
    COMPLEX,
    Peer("timm apply_rot_embed_cat", "interleaved", _timm),
    Peer("rotary-embedding-torch", "interleaved", _rotary_embedding_torch),
    Peer("rotate_half (transformers)", "half", _transformers),
    COMPILED,
)
