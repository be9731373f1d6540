"""Shared measures for the recipe parity tests (tests/test_recipes_*.py).

Each parity test prints one line ``PARITY <recipe> ...`` with the errors it asserted on; the README's
table comes from ``python -m pytest tests/test_recipes_language.py tests/test_recipes_multimodal.py
tests/test_recipes_vision.py -q -s | grep PARITY``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: float64 rotations with equal frequencies must agree to this (the issue's bar).
F64_TOL = 1e-12
#: A float32-computed peer frequency vs our float64 formula: a few float32 ulps, relative.
F32_FREQ_RTOL = 2e-6


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def max_rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=torch.finfo(torch.float64).tiny)
    return float(((a - b).abs() / scale).max())


def report(name: str, **errors: float) -> None:
    print("PARITY", name, " ".join(f"{k}={v:.2e}" for k, v in errors.items()))
