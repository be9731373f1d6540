"""Checkpoints and run folders that nothing can half-write or share.

* `AtomicCheckpointIO`: every checkpoint is serialized in memory, written to a temp file in its own
  folder, fsynced and renamed over the old one, so a failed save (disk full, kill) leaves the previous
  checkpoint intact and resumable. Lightning's own save writes through a temp file in ``TMPDIR`` and
  copies it into place, which half-writes the final file when the run folder's disk fills up.
* `read_checkpoint`: loads a checkpoint (tensors only, ``weights_only=True``) and says plainly when a
  file is empty, truncated or not a checkpoint at all.
* `lock_run_folder`: an exclusive ``flock`` on ``<run folder>/.lock`` held while a process trains or
  tests in it; a second process gets a clear error instead of writing into the same folder.
"""

from __future__ import annotations

import fcntl
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from .files import atomic_write


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


class RunFolderLock:
    """Exclusive lock on ``<folder>/.lock`` for this process's lifetime (or until `release`)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / ".lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise RuntimeError(
                f"{what} {os.fspath(self.folder)!r} is in use by another process (pid {holder}, lock "
                f"{os.fspath(self.path)}); wait for it to finish or stop it, or choose another folder"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
