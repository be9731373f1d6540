"""Argument validation shared by ndrope and vit: every error names the argument, its value and what is accepted."""

from __future__ import annotations

import math
from typing import Any, get_args

import torch
from torch import Tensor


def choices(literal: Any) -> tuple[str, ...]:
    """The accepted strings of a ``Literal[...]`` type: the one source of truth for each string option."""
    return tuple(get_args(literal))


def check_choice(name: str, value: Any, literal: Any) -> str:
    """``value`` if it is one of the strings of ``literal`` (a ``Literal[...]`` type), else ValueError."""
    accepted = choices(literal)
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(accepted)}")
    return value


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


def check_number(name: str, value: Any, *, minimum: float | None = 0.0, inclusive: bool = False) -> float:
    """A finite real number, > ``minimum`` (>= with ``inclusive``; any finite number when minimum is None).
    Skipped while tracing: under ``torch.compile(dynamic=True)`` Python floats become symbolic, and
    ``math.isfinite`` of one is a graph break."""
    if torch.compiler.is_compiling():
        return value
    bound = "" if minimum is None else (f" >= {minimum}" if inclusive else f" > {minimum}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a finite number{bound}")
    below = minimum is not None and (value < minimum or (value == minimum and not inclusive))
    if not math.isfinite(value) or below:
        raise ValueError(f"{name}={value!r} must be a finite number{bound}")
    return float(value)


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


def check_real(name: str, value: Tensor) -> Tensor:
    """An integer or floating tensor (not bool, not complex)."""
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real (integer or floating) tensor, got dtype {value.dtype}")
    return value


def check_floating(name: str, value: Tensor) -> Tensor:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{name} is on {value.device} but {other_name} is on {other.device}; put them on one device")


#: Float dtypes too narrow for positions, and the largest integer each holds exactly.
NARROW_POSITION_DTYPES = {torch.bfloat16: 256, torch.float16: 2048}
#: Integers beyond this lose precision in float64, where angles are computed.
FLOAT64_EXACT_INTEGERS = 2**53


def check_position_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Refuse bfloat16/float16 positions: they round ordinary positions (bfloat16 holds integers exactly
    only up to 256: position 301 becomes 300, a 3 rad angle error at the fastest frequency)."""
    if dtype in NARROW_POSITION_DTYPES:
        limit = NARROW_POSITION_DTYPES[dtype]
        raise TypeError(
            f"{name} has dtype {dtype}, which holds integer positions exactly only up to {limit}; use float32, "
            "float64 or an integer dtype (build positions before casting the model or entering autocast)"
        )
    return dtype


def check_finite(name: str, value: Tensor, *others: tuple[str, Tensor]) -> Tensor:
    """Reject NaN/inf in floating tensors, and int64 values beyond 2**53 (not exact in float64, where
    angles are computed), in ``value`` and in any (name, tensor) of ``others``, with one device sync for
    all. Skipped while tracing (no data-dependent branch for torch.compile) and for tensors without data
    (meta, fake). Returns ``value``."""
    named = [(name, value), *others]
    if torch.compiler.is_compiling():
        return value
    checked = [(n, t) for n, t in named if t.device.type != "meta" and (t.is_floating_point() or t.dtype == torch.int64)]
    if not checked:
        return value
    flags = [
        torch.isfinite(t).all() if t.is_floating_point() else (t.abs() <= FLOAT64_EXACT_INTEGERS).all() for _, t in checked
    ]
    if bool(torch.stack(flags).all() if len(flags) > 1 else flags[0]):
        return value
    bad, tensor = next((n, t) for (n, t), flag in zip(checked, flags) if not bool(flag))
    if tensor.is_floating_point():
        raise ValueError(f"{bad} contains non-finite values (NaN or inf); it must be finite")
    raise ValueError(
        f"{bad} contains integers beyond 2**53 (largest magnitude {int(tensor.abs().max())}), which float64, where "
        "angles are computed, cannot hold exactly; offset the positions (only differences matter to attention)"
    )
