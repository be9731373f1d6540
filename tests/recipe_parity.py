"""Shared measures for the recipe parity tests (tests/test_recipes_*.py).

Each parity test prints one line ``PARITY <recipe> ...`` with the errors it asserted on; the README's
table comes from ``python -m pytest tests/test_recipes_language.py tests/test_recipes_multimodal.py
tests/test_recipes_vision.py -q -s | grep PARITY``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: float64 rotations with equal frequencies must agree to this.
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


def float32_floor(x: Tensor) -> float:
    """Two float32 roundings of the largest input entry: below this, float32 results are at their noise floor."""
    return 2 * torch.finfo(torch.float32).eps * float(x.abs().max())


def assert_no_worse_than_peer(name: str, err_ours: float, err_peer: float, x: Tensor, peer_bound: float) -> None:
    """ndrope's float32 error is at most the peer's own (or both sit at float32's rounding floor), and the
    peer's float32 result is close to our float64 oracle (which checks the oracle: it is our recipe)."""
    assert err_peer <= peer_bound, f"{name}: the peer's float32 result is {err_peer:.2e} from our float64 recipe"
    assert err_ours <= max(err_peer, float32_floor(x)), f"{name}: ndrope float32 {err_ours:.2e} > peer {err_peer:.2e}"
