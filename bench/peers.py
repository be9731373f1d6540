"""The rotations ndrope is measured against, each fed the same angles in its own table format.

Every peer is built from angles (N, P) and a dtype, and returns ``apply(q, k) -> (q, k)``.
Tables are prepared outside the timed call, as a model would cache them (rotary-embedding-torch
takes angles and computes cos/sin inside its call, so that is part of its time). `CPU_PEERS` and
`CUDA_PEERS` are what ``python -m bench`` times on each device; the GPU kernels (Liger's, flash-attn's)
are imported on first use and skipped where they are not installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """q and k through `ndrope.apply_rotary_pair`, as `ndrope.RotaryEmbedding` rotates them (one launch on CUDA)."""

    def make(theta: Tensor, dtype: torch.dtype) -> Apply:
        cos_sin = ndrope.cos_sin(theta)
        return lambda q, k: ndrope.apply_rotary_pair(q, k, cos_sin, layout=layout)

    return make


@contextlib.contextmanager
def compiled_rotation(choice: str) -> Iterator[None]:
    """`ndrope.set_compiled_rotation` for the duration of a call (it is read when a graph is traced)."""
    previous = ndrope.set_compiled_rotation(choice)
    try:
        yield
    finally:
        ndrope.set_compiled_rotation(previous)


def _ndrope_compiled(choice: str) -> Callable[[Tensor, torch.dtype], Apply]:
    """``torch.compile`` of the half-layout pair, traced into ndrope's kernel or into the formula."""

    def make(theta: Tensor, dtype: torch.dtype) -> Apply:
        cos_sin = ndrope.cos_sin(theta)
        compiled = torch.compile(lambda q, k: ndrope.apply_rotary_pair(q, k, cos_sin), dynamic=False)

        def apply(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            with compiled_rotation(choice):  # graphs for new inputs (backward) are traced with this choice too
                return compiled(q, k)

        return apply

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
    compiled = torch.compile(_rotate_half_formula, dynamic=False)
    return lambda q, k: compiled(q, k, cos, sin)


def _liger(theta: Tensor, dtype: torch.dtype) -> Apply:
    """Liger-Kernel's Triton rope (one kernel for q and k), with transformers' tables (1, N, D) in x's dtype."""
    from liger_kernel.ops.rope import LigerRopeFunction

    cos, sin = (t[None] for t in _rotate_half_tables(theta, dtype))
    return lambda q, k: LigerRopeFunction.apply(q, k, cos, sin)


def _flash_attn(theta: Tensor, dtype: torch.dtype) -> Apply:
    """flash-attn's Triton rotary (float32 math), on (B, N, H, D) views of q and k, float32 tables (N, P)."""
    from flash_attn.layers.rotary import apply_rotary_emb

    cos, sin = theta.cos(), theta.sin()

    def rotate(x: Tensor) -> Tensor:
        return apply_rotary_emb(x.transpose(1, 2), cos, sin).transpose(1, 2)

    return lambda q, k: (rotate(q), rotate(k))


COPY = Peer("copy bound (q * 1.5, k * 1.5)", "-", _copy)
#: ndrope's `apply_rotary_pair` (the registered op: the C++ kernel on CPU, the Triton kernel on CUDA)
NDROPE = (
    Peer("ndrope half", "half", _ndrope("half")),
    Peer("ndrope interleaved", "interleaved", _ndrope("interleaved")),
)
#: ndrope under torch.compile, with each `ndrope.CompiledRotation`
NDROPE_COMPILED = (
    Peer("ndrope half, compiled: kernel", "half", _ndrope_compiled("kernel")),
    Peer("ndrope half, compiled: formula", "half", _ndrope_compiled("formula")),
)
COMPLEX = Peer("complex (view_as_complex)", "interleaved", _complex)
TRANSFORMERS = Peer("rotate_half (transformers)", "half", _transformers)
COMPILED = Peer("torch.compile(rotate_half)", "half", _compiled)
LIGER = Peer("Liger rope (Triton)", "half", _liger)
FLASH_ATTN = Peer("flash-attn rotary (Triton)", "half", _flash_attn)
CPU_PEERS = (
    COMPLEX,
    Peer("timm apply_rot_embed_cat", "interleaved", _timm),
    Peer("rotary-embedding-torch", "interleaved", _rotary_embedding_torch),
    TRANSFORMERS,
    COMPILED,
)
CUDA_PEERS = (*NDROPE_COMPILED, TRANSFORMERS, COMPILED, LIGER, FLASH_ATTN)
#: the peers that go through torch.compile (skipped with --skip-compile)
COMPILING = (COMPILED, *NDROPE_COMPILED)
