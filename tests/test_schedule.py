"""`training.schedule.warmup_cosine`, the learning-rate multiplier of the Lightning module and the examples."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.schedule import warmup_cosine


def test_warmup_is_linear_up_to_one() -> None:
    assert [warmup_cosine(s, 4, 20, 0.1) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("min_ratio", [0.0, 0.01, 0.1])
def test_cosine_decays_to_min_ratio_and_stays(min_ratio: float) -> None:
    warmup, total = 10, 110
    values = [warmup_cosine(s, warmup, total, min_ratio) for s in range(warmup, total + 5)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after the warmup
    assert warmup_cosine(warmup + 50, warmup, total, min_ratio) == pytest.approx((1 + min_ratio) / 2)  # half-way
    assert warmup_cosine(warmup + 25, warmup, total, min_ratio) == pytest.approx(
        min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi / 4)) / 2
    )
    assert values[-5:] == [pytest.approx(min_ratio)] * 5  # reaches min_ratio at total_steps, then stays


def test_drives_lambda_lr_as_the_training_module_does() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 2, 10, 0.5))
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == [1.0, 2.0, 2.0] and rates[-2:] == [1.0, 1.0]  # lr * (warmup, 1, ..., min_ratio from step 10)


def test_imports_no_lightning() -> None:
    code = "import sys, training.schedule, training.files; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "False"
