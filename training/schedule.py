"""Learning-rate schedules as plain functions of the optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

No lightning here: `training.module.ImageClassifier` and the examples (`examples/`) use the same schedule.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer ``step``: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
