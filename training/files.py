"""Files written whole or not at all: one file (`atomic_write`), several published together
(`write_together`), and the Markdown tables inside them.

The one writer of every file the repository produces: checkpoints (`training.checkpoint`), eval and
study reports (`training.report`), bench results (``python -m bench --out``) and the examples' reports.
Files that users read are plain files with mode 0644 less the umask (``rw-r--r--`` under the usual
umask 022). Standard library only, so that bench and the examples use it without lightning.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # less the umask (the kernel applies it when the temp file is created)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _stage(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to a new fsynced temp file next to ``path`` and return the temp file's path.

    Temp files that a killed writer of the same path left behind are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            _write_all(fd, data.encode() if isinstance(data, str) else data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and ``os.replace``.

    On any error (disk full, interrupt) the previous content of ``path`` is untouched and the temp file
    is removed. The file gets mode 0644 less the umask.
    """
    path = Path(path)
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_together(folder: str | os.PathLike, files: dict[str, str | bytes]) -> dict[str, Path]:
    """Publish ``files`` (name -> content) as plain files in ``folder``, together as far as plain files allow.

    All are staged as fsynced temp files first, the files they replace are held by a hard link (`_hold`),
    then the renames run back to back (tens of microseconds). A failure while staging (an error, a full
    disk, Ctrl-C) leaves the previous files whole; an exception between two renames (Ctrl-C) completes the
    remaining renames before it propagates. Only SIGKILL or a power cut inside those microseconds can leave
    files of two writes side by side: give the files a common id if a reader must detect that.
    """
    folder = Path(folder)
    staged: dict[Path, Path] = {}
    try:
        for name, data in files.items():
            staged[folder / name] = _stage(folder / name, data)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    held = _hold(staged)
    try:
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except BaseException:
        pending = {path: tmp for path, tmp in staged.items() if tmp.exists()}
        if len(pending) == len(staged):  # nothing published yet: the previous files stay as they are
            for tmp in pending.values():
                tmp.unlink(missing_ok=True)
        else:  # interrupted between two renames: finish, so the files come from one write
            for path, tmp in pending.items():
                os.replace(tmp, path)
        raise
    finally:
        fsync_dir(folder)
        for link in held:
            link.unlink(missing_ok=True)
    return {name: folder / name for name in files}


def _hold(paths: Iterable[Path]) -> list[Path]:
    """Hard links to the files about to be replaced, for the time of the renames: a rename that drops the last
    link of the old file also frees its blocks (milliseconds on ext4), so without them the renames take
    milliseconds instead of tens of microseconds. Skipped where there is no old file or no hard links."""
    held = []
    for path in paths:
        link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.link(path, link)
        except OSError:
            continue
        held.append(link)
    return held


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (fsync of the directory); a no-op where that is not possible."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table of ``rows`` (one sequence of cells each, written with ``str``); numbers are
    right-aligned (every column but the first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
