"""Callbacks that interrupt a fit at a chosen optimizer step, for the resume and signal tests.

`PauseAtStep` also works in a train.py subprocess: put this folder on its PYTHONPATH and pass
``--trainer.callbacks+=interruptions.PauseAtStep --trainer.callbacks.step=N --trainer.callbacks.folder=DIR``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAtStep(Callback):
    """Sends ``signum`` to this process as the batch after ``step`` optimizer steps starts: an interrupt mid-step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalAtTestBatch(Callback):
    """Sends ``signum`` to this process as test batch ``batch`` (of the first test loader) starts."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0 and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class CrashAtStep(Callback):
    """Raises as the batch after ``step`` optimizer steps starts, saving nothing: a kill -9 or an out-of-memory kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class PauseAtStep(Callback):
    """As the batch after ``step`` optimizer steps starts, writes ``<folder>/paused-<pid>`` and waits (at most two
    minutes) for ``<folder>/go``: the test knows which process is at which step when it sends a signal."""

    def __init__(self, step: int, folder: str) -> None:
        self.step, self.folder = step, Path(folder)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            (self.folder / f"paused-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while not (self.folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
