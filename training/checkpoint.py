"""Checkpoints and run folders that nothing can half-write or share.

* `AtomicCheckpointIO`: every checkpoint is serialized in memory, written to a temp file in its own
  folder, fsynced and renamed over the old one, so a failed save (disk full, kill) leaves the previous
  checkpoint intact and resumable. Lightning's own save writes through a temp file in ``TMPDIR`` and
  copies it into place, which half-writes the final file when the run folder's disk fills up.
* `read_checkpoint`: loads a checkpoint (tensors only, ``weights_only=True``) and says plainly when a
  file is empty, truncated or not a checkpoint at all.
* `LastCheckpoint`: keeps ``last.ckpt`` the point a fit resumes from (epoch ends, every few minutes,
  SIGTERM / Ctrl-C, the end of the fit) and marks a fit that ran to its end; `fit_completed` reads the mark.
* `RunFolderLock`: an exclusive ``flock`` on ``<run folder>/.lock`` held while a process trains or
  tests in it (the file is removed with the lock); a second process gets a clear error instead of writing
  into the same folder.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from .files import atomic_write

#: Written next to last.ckpt by `LastCheckpoint` when a fit ends normally; read by `fit_completed`.
FIT_COMPLETED = "fit_completed.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are all-or-nothing (temp file in the same folder + fsync + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r} is not supported by {type(self).__name__}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getbuffer())


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (on CPU); ValueError naming the file when it is not a usable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={os.fspath(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"ckpt_path={os.fspath(path)!r} is empty (0 bytes): not a checkpoint; a save was interrupted")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} ({size} bytes) is not a checkpoint: PyTorch checkpoints are zip archives "
            "and this file is not one (random bytes, another format, or a copy cut short)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} holds Python objects other than tensors and plain values; it was not "
            "written by train.py, and loading it could run arbitrary code, so it is refused"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} ({size} bytes) is a damaged checkpoint (truncated or corrupt: "
            f"{type(error).__name__}); resume from another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} holds a {type(checkpoint).__name__} without 'state_dict': "
            "not a Lightning checkpoint"
        )
    return checkpoint


def checkpoint_dir(run_folder: str | os.PathLike) -> str:
    """``<run_folder>/checkpoints``: best.ckpt, last.ckpt and the fit's completion mark."""
    return os.path.join(os.fspath(run_folder), "checkpoints")


class FitInterrupted(SystemExit):
    """Raised by `LastCheckpoint` once a fit stopped by a signal has saved last.ckpt: the process exits with
    status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), never 0."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt``, where ``fit --ckpt_path last`` resumes: exactly, also inside an epoch.

    It is saved at the end of every training epoch (after the epoch's validation), every ``every_n_minutes``
    of training and every ``every_n_train_steps`` optimizer steps (when set), and when SIGTERM or SIGINT
    (Ctrl-C) arrives: the fit then stops at the end of the current step (after the validation, on the step
    that ends an epoch or the fit), saves, and exits with status 128 + the signal number. A second Ctrl-C
    stops at once, without saving. A fit that runs to its end (``max_epochs`` / ``max_steps`` reached, or
    stopped by a callback such as early stopping) leaves last.ckpt at its final state and writes
    ``fit_completed.json`` next to it (global step, epoch, budget and the seconds this process spent; see
    `fit_completed`); starting a fit removes that mark. Under DDP the
    ranks agree on every save and stop, so they stop at the same step. Nothing is saved in a
    ``fast_dev_run``.

    Args:
        dirpath: the checkpoint folder (train.py links ``<trainer.default_root_dir>/checkpoints``).
        every_n_minutes: minutes of training between saves inside an epoch; None saves only at epoch ends,
            on signals and at the end. Default 5: a kill -9, an out-of-memory kill or a power cut loses at
            most 5 minutes, for one save per 5 minutes (the 260 MB of a ViT-S/16 with its AdamW state took
            1.7-6 s to write on a loaded 2-core VM: at most 2% of the time; the tiny CPU models, milliseconds).
        every_n_train_steps: also save every that many optimizer steps; None: off.
    """

    def __init__(
        self, dirpath: str | None = None, every_n_minutes: float | None = 5.0, every_n_train_steps: int | None = None
    ) -> None:
        super().__init__()
        if every_n_minutes is not None and (isinstance(every_n_minutes, bool) or not every_n_minutes > 0):
            raise ValueError(f"every_n_minutes={every_n_minutes!r} must be > 0, or None for no timed saves")
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1
        ):
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} must be a positive int, or None")
        self.dirpath = dirpath
        self.every_n_minutes = every_n_minutes
        self.every_n_train_steps = every_n_train_steps
        self._signal = 0  # the signal that asked the fit to stop (0: none)
        self._previous_handlers: dict[int, Any] = {}
        self._last_save = self._fit_start = 0.0
        self._saved_at: tuple[int, bool] | None = None  # (global step, at an epoch end) of the latest save

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / "last.ckpt"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = checkpoint_dir(trainer.default_root_dir)
        self._fit_start = time.monotonic()
        if stage == "fit" and trainer.is_global_zero and not trainer.fast_dev_run:
            (Path(self.dirpath) / FIT_COMPLETED).unlink(missing_ok=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_save = time.monotonic()
        self._signal = 0
        # Installed after Lightning's own SIGTERM handler, which would stop at other points (inside validation).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signal:
            raise KeyboardInterrupt
        self._signal = signum
        again = " (Ctrl-C again: stop now, without saving)" if signum == signal.SIGINT else ""
        print(f"[train] {signal.Signals(signum).name}: stopping after this step, saving {self.path}{again}",
              file=sys.stderr, flush=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fast_dev_run or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only between optimizer steps: accumulated gradients are not saved
        # After the step that ends the epoch or the fit comes validation: saving and stopping wait for the epoch end.
        final_step = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if batch_idx + 1 >= trainer.num_training_batches or final_step or trainer.should_stop:
            return
        steps = self.every_n_train_steps
        due = bool(steps and trainer.global_step % steps == 0) or (
            self.every_n_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_n_minutes
        )
        stop, save = self._agree(trainer, pl_module, due)
        if save or stop:
            self._save(trainer, epoch_end=False)
        if stop:
            raise FitInterrupted(stop)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        self._save(trainer, epoch_end=True)
        stop, _ = self._agree(trainer, pl_module, False)
        if stop:
            raise FitInterrupted(stop)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if trainer.fast_dev_run:
            return
        if self._saved_at != (trainer.global_step, True):  # e.g. a resumed fit that had nothing left to do
            self._save(trainer, epoch_end=True)
        if trainer.is_global_zero:
            mark = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                    "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps, "checkpoint": self.path.name,
                    "seconds": time.monotonic() - self._fit_start}  # of the fit (this process) that ended it
            atomic_write(Path(self.dirpath) / FIT_COMPLETED, json.dumps(mark, indent=2) + "\n")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _agree(self, trainer: Trainer, pl_module: LightningModule, due: bool) -> tuple[int, bool]:
        """(signal to stop for, or 0; whether to save): any rank's request counts, so all ranks act at one step."""
        stop = self._signal
        if trainer.world_size > 1:
            flags = torch.tensor([stop, int(due)], device=pl_module.device)
            stop, due = (int(v) for v in trainer.strategy.reduce(flags, reduce_op="max").tolist())
        return stop, bool(due)

    def _save(self, trainer: Trainer, epoch_end: bool) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_save = time.monotonic()
        self._saved_at = (trainer.global_step, epoch_end)
        if self._signal and trainer.is_global_zero:
            print(f"[train] saved {self.path} (epoch {trainer.current_epoch}, step {trainer.global_step}); "
                  "continue with --ckpt_path last", file=sys.stderr, flush=True)

    def _restore_handlers(self) -> None:
        while self._previous_handlers:
            signum, handler = self._previous_handlers.popitem()
            signal.signal(signum, handler)


def fit_completed(run_folder: str | os.PathLike) -> bool:
    """Whether the latest fit in ``run_folder`` ran to its end: `LastCheckpoint`'s mark is there and last.ckpt holds
    the state it marked. False while a fit runs, and after one was interrupted, failed or never started."""
    folder = Path(checkpoint_dir(run_folder))
    try:
        mark = json.loads((folder / FIT_COMPLETED).read_text())
        # mmap: only the small header is read, whatever the size of the weights.
        last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile):
        return False
    return isinstance(last, dict) and last.get("global_step") == mark.get("global_step")


def check_folder(path: str | os.PathLike, argument: str) -> Path:
    """``path`` as a Path; ValueError naming ``argument`` when ``path``, or a folder above it, is a file."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"is inside {os.fspath(part)!r}, which is a file"
                raise ValueError(f"{argument}={os.fspath(path)!r} {where}, not a folder; choose a folder path")
            break
    return path


class RunFolderLock:
    """Exclusive lock on ``<folder>/.lock`` for this process's lifetime (or until `release`); ``argument`` names
    the option that chose the folder, for the error when it is a file.

    The file holds the holder's pid and is removed on `release`, so a folder not in use has no ``.lock``. A holder
    killed without a word (kill -9) leaves its file behind, but not its lock (the kernel drops a dead process's
    ``flock``): the next process takes the stale file over, writes its own pid, and removes it when it is done.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run folder", argument: str = "folder") -> None:
        self._fd: int | None = None
        self._owner = os.getpid()
        self.folder = check_folder(folder, argument)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / ".lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RuntimeError(
                    f"{what} {os.fspath(self.folder)!r} is in use by another process (pid {holder}{_gone(holder)}, "
                    f"lock {os.fspath(self.path)}); wait for it to finish or stop it, or choose another folder"
                ) from None
            # The holder we raced with may have removed the file between our open and our flock: only the file
            # that is at the path now is the lock, so lock that one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Remove the lock file and unlock (in that order, so that no process locks a file that is being removed).
        Only in the process that took the lock: a forked child (a data worker) shares the lock, and leaves it."""
        if self._fd is not None and os.getpid() == self._owner:
            if _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` (not one removed from there)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _gone(pid: str) -> str:
    """``", which has exited: its child processes hold the lock"`` when no process ``pid`` runs any more, else ``""``."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, PermissionError):
        return ""
    except ProcessLookupError:
        return ", which has exited: processes it started still hold the lock"
    return ""
