"""Shared measures for the integration tests (tests/test_integrations_*.py): a patched model against its original.

Each model test prints one line ``PARITY <library>:<model> ...`` with the errors it asserted on; the README's
"Inside transformers and timm models" table comes from ``python -m pytest tests/test_integrations_transformers.py
tests/test_integrations_timm.py -q -s -p no:randomly | grep PARITY``.
"""

from __future__ import annotations

import copy

import torch
from recipe_parity import float32_floor, max_abs, report
from torch import Tensor, nn

#: RoPE's own effect on the output must exceed the patched-vs-original difference by this much: the test sees RoPE.
ROPE_EFFECT_RATIO = 1e3
#: float32 rounding through a few layers: the patched model stays within this many float32 epsilons (times the
#: output's largest entry) of the original.
FLOAT32_EPSILONS = 64


def assert_same_model(
    name: str, *, original: Tensor, patched: Tensor, no_rope: Tensor, oracle: Tensor | None = None
) -> dict[str, float]:
    """``patched`` (float32) equals ``original`` (float32) to float32 rounding, far below RoPE's own effect
    (``no_rope``: the original without RoPE); against ``oracle`` (the patched model in float64, the exact formula)
    ndrope's error is no worse than the original's (or both sit at float32's floor). Reports a PARITY line."""
    err = max_abs(patched, original)
    effect = max_abs(original, no_rope)
    bound = FLOAT32_EPSILONS * torch.finfo(torch.float32).eps * float(original.abs().max())
    assert err <= bound, f"{name}: patched differs from the original by {err:.2e} (> {bound:.2e}, float32 rounding)"
    assert effect >= ROPE_EFFECT_RATIO * err, f"{name}: RoPE moves the output by {effect:.2e}, patching by {err:.2e}"
    errors = {"vs_original": err, "rope_effect": effect}
    if oracle is not None:
        ours, theirs = max_abs(patched, oracle), max_abs(original, oracle)
        assert ours <= max(2 * theirs, float32_floor(oracle)), f"{name}: ndrope {ours:.2e} vs original {theirs:.2e}"
        errors |= {"ndrope_vs_f64": ours, "original_vs_f64": theirs}
    report(name, **errors)
    return errors


def rotations(run) -> int:
    """How many times ``run()`` calls the op ``ndrope::rotate`` (the profiler records every registered op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key == "ndrope::rotate")


def zero_inv_freq(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose rotary modules turn nothing (every ``*inv_freq`` buffer zero): RoPE removed."""
    model = copy.deepcopy(model)
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            buffer.zero_()
    return model


def assert_gradients_match(
    original: nn.Module, patched: nn.Module, rtol: float = 1e-3, *, skip: frozenset[str] = frozenset()
) -> None:
    """After a backward pass on both: every parameter that has a gradient in the original has a finite one, as
    large, in the patched model (names in the message); ``skip`` names parameters the patch re-laid out."""
    patched_params = dict(patched.named_parameters())
    for name, param in original.named_parameters():
        if param.grad is None or name in skip:
            continue
        grad = patched_params[name].grad
        assert grad is not None, f"{name}: no gradient in the patched model"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        scale = float(param.grad.abs().max()) or 1.0
        assert max_abs(grad, param.grad) <= rtol * scale, f"{name}: gradient differs by {max_abs(grad, param.grad):.2e}"
