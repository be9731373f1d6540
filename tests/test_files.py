"""`training.files`: every result file is written whole or not at all, and its Markdown tables."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

import training.files
from training.files import atomic_write, markdown_table


class TestAtomicWrite:
    def test_writes_text_and_bytes_and_returns_the_path(self, tmp_path: Path) -> None:
        target = tmp_path / "new" / "folder" / "a.txt"
        assert atomic_write(target, "héllo\n") == target
        assert target.read_text(encoding="utf-8") == "héllo\n"
        atomic_write(target, memoryview(b"\x00\x01"))
        assert target.read_bytes() == b"\x00\x01"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]

    def test_a_write_that_dies_halfway_keeps_the_old_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Disk full after half the bytes: the old content stays, the partial temp file is removed."""
        target = atomic_write(tmp_path / "results.json", "old\n")
        real_write_all = training.files._write_all

        def disk_full(fd: int, data: bytes) -> None:
            real_write_all(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(training.files, "_write_all", disk_full)
        with pytest.raises(OSError, match="No space left"):
            atomic_write(target, "new content\n")
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    def test_removes_temp_files_a_killed_writer_left(self, tmp_path: Path) -> None:
        stale = tmp_path / ".a.txt.abc123.tmp"
        stale.write_text("half")
        other = tmp_path / ".b.txt.abc123.tmp"  # another file's writer may still be running
        other.write_text("half")
        atomic_write(tmp_path / "a.txt", "whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".b.txt.abc123.tmp", "a.txt"]

    def test_a_reader_never_sees_a_partial_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Until the rename the target keeps its old content: the new bytes live in a temp file."""
        target = atomic_write(tmp_path / "a.txt", "old")
        real_replace = os.replace
        seen = []

        def replace(src: str, dst: str) -> None:
            seen.append((Path(dst).read_text(), Path(src).read_text()))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        atomic_write(target, "new")
        assert seen == [("old", "new")] and target.read_text() == "new"


def test_markdown_table_right_aligns_every_column_but_the_first() -> None:
    table = markdown_table(["name", "top-1 (%)", "n"], [["a", "91.50", 3], ("b", 7.0, None)])
    assert table.splitlines() == [
        "| name | top-1 (%) | n |",
        "|---|---:|---:|",
        "| a | 91.50 | 3 |",
        "| b | 7.0 | None |",
    ]
    assert table.endswith("\n")
