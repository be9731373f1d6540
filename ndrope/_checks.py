"""Argument validation shared by the public functions: every error names the argument and its value."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be an int >= {minimum}")
    return value


def check_even_dim(name: str, value: Any) -> int:
    check_int(name, value, minimum=2)
    if value % 2:
        raise ValueError(f"{name}={value} must be even: RoPE rotates channels in pairs")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a positive finite number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} must be a positive finite number")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")
    return value


def check_shape(name: str, value: Any) -> tuple[int, ...]:
    """A grid shape: a non-empty sequence of positive ints (an int is read as a 1-tuple)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise TypeError(f"{name}={value!r} must be a non-empty tuple of positive ints, e.g. (14, 14)")
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={tuple(value)!r} must contain only positive ints")
    return tuple(value)


def check_tensor(name: str, value: Any, *, min_rank: int = 1) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}, got shape {tuple(value.shape)}")
    return value


def check_finite(name: str, value: Tensor) -> Tensor:
    """Reject NaN/inf; skipped while tracing so torch.compile sees no data-dependent branch."""
    if torch.compiler.is_compiling() or not value.is_floating_point():
        return value
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); positions must be finite")
    return value
