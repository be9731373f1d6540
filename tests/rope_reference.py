"""Independent references for the tests: explicit rotation matrices and the textbook 1D formulas.

Nothing here calls ndrope's rotation code, so agreement is evidence, not tautology.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pair_index(dim: int, pairs: int, layout: str) -> tuple[Tensor, Tensor]:
    """Channel indices (first, second) of each rotated pair in a head of ``dim`` channels."""
    j = torch.arange(pairs)
    if layout == "half":
        return j, j + pairs
    return 2 * j, 2 * j + 1


def rotation_matrix(theta: Tensor, dim: int, layout: str) -> Tensor:
    """Block-diagonal (up to a permutation) rotation matrices (..., dim, dim) for angles (..., P)."""
    pairs = theta.shape[-1]
    first, second = pair_index(dim, pairs, layout)
    matrix = torch.zeros(*theta.shape[:-1], dim, dim, dtype=torch.float64)
    matrix[..., range(dim), range(dim)] = 1.0  # channels beyond 2P stay put
    cos, sin = torch.cos(theta.double()), torch.sin(theta.double())
    matrix[..., first, first] = cos
    matrix[..., first, second] = -sin
    matrix[..., second, first] = sin
    matrix[..., second, second] = cos
    return matrix


def rotate_with_matrices(x: Tensor, theta: Tensor, layout: str) -> Tensor:
    """x (..., N, D) rotated by explicit matrices built from theta broadcastable to (..., N, P); float64."""
    matrices = rotation_matrix(theta, x.shape[-1], layout)
    return (matrices @ x.double().unsqueeze(-1)).squeeze(-1)


def llama_rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def llama_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """The transformers (GPT-NeoX / Llama) formula: x * cos + rotate_half(x) * sin, in float64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(positions.double(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return x.double() * emb.cos() + llama_rotate_half(x.double()) * emb.sin()


def meta_complex_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Meta's Llama code: interleaved pairs as complex numbers times polar(1, angle), in float64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    freqs_cis = torch.polar(torch.ones(positions.shape[0], dim // 2, dtype=torch.float64), torch.outer(positions.double(), inv_freq))
    x_complex = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_cis).flatten(-2)


def even_split(pairs: int, n_axes: int) -> tuple[int, ...]:
    """Pairs per axis as the README states the default: as even as possible, the last axes one more."""
    base, extra = divmod(pairs, n_axes)
    return tuple(base + (1 if axis >= n_axes - extra else 0) for axis in range(n_axes))


def rotate_formula(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """The textbook pair rotation (x1 c - x2 s, x2 c + x1 s) on the first 2P channels, in float64,
    returned in x's dtype after one rounding. cos/sin (..., N, P) broadcast against x (..., N, D)."""
    pairs, dim = cos.shape[-1], x.shape[-1]
    first, second = pair_index(dim, pairs, layout)
    wide, c, s = x.double(), cos.double(), sin.double()
    shape = torch.broadcast_shapes(wide.shape[:-1], c.shape[:-1])
    out = wide.expand(*shape, dim).clone()
    x1, x2 = wide[..., first], wide[..., second]
    out[..., first] = x1 * c - x2 * s
    out[..., second] = x2 * c + x1 * s
    return out.to(x.dtype)


def wrapped(angle: torch.Tensor) -> torch.Tensor:
    """An angle difference reduced to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def true_ladder(dim: int, theta: float) -> torch.Tensor:
    """The 1D ladder theta ** (-k / m), m = dim // 2 pairs, in float64."""
    m = dim // 2
    return theta ** (-torch.arange(m, dtype=torch.float64) / m)
