"""The compiled-kernel cache: only a library this user's build recorded is ever loaded; builds are shared, bounded in time and cleaned up.

Every test builds into its own ``NDROPE_CACHE_DIR`` with an unoptimised compile (the same source and
checks, about a second instead of five), so the user's real cache is never touched.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rope_reference import rotate_formula

import ndrope
from ndrope import _kernel

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")

PLANT = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char* marker = getenv("NDROPE_TEST_MARKER");
  FILE* f = marker ? fopen(marker, "w") : NULL;
  if (f) { fputs("planted code ran", f); fclose(f); }
}
"""


def fast_command() -> list[str]:
    return [os.environ.get("CXX", "c++"), "-O0", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> SimpleNamespace:
    folder = tmp_path / "cache"
    monkeypatch.setenv("NDROPE_CACHE_DIR", str(folder))
    monkeypatch.setattr(_kernel, "_command", fast_command)
    path = _kernel.library_path()
    assert path.parent == folder
    return SimpleNamespace(folder=folder, path=path, record=path.with_suffix(".sha256"), tmp=tmp_path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_recorded_build(cache: SimpleNamespace) -> bool:
    return cache.path.exists() and cache.record.exists() and cache.record.read_text().strip() == sha256(cache.path)


def planted_library(tmp: Path) -> Path:
    source = tmp / "plant.c"
    source.write_text(PLANT)
    out = tmp / "plant.so"
    subprocess.run([os.environ.get("CXX", "c++"), "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out


def rotate_with(lib: ctypes.CDLL, monkeypatch) -> None:
    """The loaded library computes the rotation (through the op, as ndrope uses it)."""
    monkeypatch.setattr(_kernel, "_library", lib)
    x, theta = torch.randn(2, 3, 5, 8), torch.randn(5, 4)
    torch.testing.assert_close(ndrope.apply_rotary(x, theta), rotate_formula(x, theta.cos(), theta.sin(), "half"), atol=1e-5, rtol=1e-5)


class TestVerifiedCache:
    def test_fresh_build_is_recorded_private_and_reused(self, cache, monkeypatch):
        lib = _kernel.load()
        assert is_recorded_build(cache)
        assert stat.S_IMODE(cache.folder.stat().st_mode) & (stat.S_IWGRP | stat.S_IWOTH) == 0
        rotate_with(lib, monkeypatch)

        def no_rebuild(target: Path) -> None:
            raise AssertionError("a verified cached library was rebuilt")

        monkeypatch.setattr(_kernel, "_build", no_rebuild)
        _kernel.load()

    def test_planted_library_without_record_is_not_loaded(self, cache, monkeypatch):
        plant = planted_library(cache.tmp)
        # the plant is live: loading it runs its constructor
        sanity = cache.tmp / "sanity.so"
        shutil.copy(plant, sanity)
        monkeypatch.setenv("NDROPE_TEST_MARKER", str(cache.tmp / "sanity-marker"))
        ctypes.CDLL(str(sanity))
        assert (cache.tmp / "sanity-marker").exists()

        marker = cache.tmp / "marker"
        monkeypatch.setenv("NDROPE_TEST_MARKER", str(marker))
        cache.folder.mkdir(mode=0o700)
        shutil.copy(plant, cache.path)
        lib = _kernel.load()
        assert not marker.exists(), "ndrope loaded a library its build did not record"
        assert is_recorded_build(cache) and sha256(cache.path) != sha256(plant)
        rotate_with(lib, monkeypatch)

    def test_planted_library_with_a_stale_record_is_not_loaded(self, cache, monkeypatch):
        _kernel.load()
        marker = cache.tmp / "marker"
        monkeypatch.setenv("NDROPE_TEST_MARKER", str(marker))
        plant = planted_library(cache.tmp)
        os.replace(plant, cache.path)  # over a good build; its record is now stale
        _kernel.load()
        assert not marker.exists()
        assert is_recorded_build(cache)

    def test_truncated_library_is_rebuilt_not_loaded(self, cache):
        """In a subprocess: mapping a truncated library could kill the process (SIGBUS). The build is made
        without loading it here: truncating a file this process has mapped would kill pytest itself."""
        cache.folder.mkdir(parents=True, mode=0o700)
        _kernel._build(cache.path)
        size = cache.path.stat().st_size
        with open(cache.path, "r+b") as handle:
            handle.truncate(size // 2)
        script = textwrap.dedent(
            f"""
            import os
            from ndrope import _kernel
            _kernel._command = lambda: {fast_command()!r}
            assert str(_kernel.library_path()) == {str(cache.path)!r}
            lib = _kernel.load()
            print("loaded", os.path.getsize({str(cache.path)!r}))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, "NDROPE_CACHE_DIR": str(cache.folder)},
            cwd=Path(__file__).resolve().parents[1],
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["loaded", str(size)]
        assert is_recorded_build(cache)


class TestUntrustedCache:
    def test_folder_writable_by_others(self, cache, monkeypatch):
        cache.folder.mkdir()
        cache.folder.chmod(0o777)
        with pytest.raises(PermissionError, match="kernel cache folder .* is writable by others"):
            _kernel.load()
        assert not cache.path.exists()

        monkeypatch.setattr(_kernel, "_library", None)
        monkeypatch.setattr(_kernel, "_failure", None)
        x, theta = torch.randn(2, 3, 5, 8), torch.randn(5, 4)
        with pytest.warns(RuntimeWarning, match="writable by others") as caught:
            out = ndrope.apply_rotary(x, theta)
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
        torch.testing.assert_close(out, rotate_formula(x, theta.cos(), theta.sin(), "half"), atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            ndrope.apply_rotary(x, theta)
        assert _kernel.library() is None and isinstance(_kernel.failure(), PermissionError)

    def test_folder_writable_by_group(self, cache):
        cache.folder.mkdir()
        cache.folder.chmod(0o770)
        with pytest.raises(PermissionError, match="writable by others"):
            _kernel.load()

    @pytest.mark.parametrize("which", ["library", "record"])
    def test_cached_files_writable_by_others(self, cache, which):
        _kernel.load()
        (cache.path if which == "library" else cache.record).chmod(0o666)
        with pytest.raises(PermissionError, match="writable by others"):
            _kernel.load()

    def test_symlinked_library(self, cache):
        _kernel.load()
        real = cache.tmp / "elsewhere.so"
        os.replace(cache.path, real)
        cache.path.symlink_to(real)
        with pytest.raises(PermissionError, match="symbolic link"):
            _kernel.load()

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
    def test_folder_of_another_user(self, cache):
        cache.folder.mkdir(mode=0o700)
        os.chown(cache.folder, 65534, -1)
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            _kernel.load()


class TestAtomicBuild:
    def test_files_appear_only_complete(self, cache, monkeypatch):
        """Compiled into a scratch folder, hashed, flushed, then renamed into place: a reader of the
        cache folder never sees a partial library or a record without its library."""
        seen: list[tuple[str, set[str]]] = []
        real_compile, real_replace = _kernel._compile, os.replace

        def visible() -> set[str]:
            return {p.name for p in cache.folder.iterdir() if not p.name.startswith(".build")}

        def compile(command, timeout):
            output = Path(command[command.index("-o") + 1])
            assert output.parent.parent == cache.folder and output.parent.name.startswith(".build-")
            seen.append(("compile", visible()))
            return real_compile(command, timeout)

        def replace(src, dst):
            src, dst = Path(src), Path(dst)
            if dst == cache.path:
                recorded = (src.parent / "digest").read_text()
                assert sha256(src) == recorded, "a library was moved into place before it was complete"
            seen.append((dst.name, visible()))
            return real_replace(src, dst)

        monkeypatch.setattr(_kernel, "_compile", compile)
        monkeypatch.setattr(_kernel.os, "replace", replace)
        _kernel.load()
        assert seen == [
            ("compile", set()),
            (cache.path.name, set()),
            (cache.record.name, {cache.path.name}),
        ]
        assert visible() == {cache.path.name, cache.record.name} and is_recorded_build(cache)
        # besides the two files, only the (empty) build lock
        assert sorted(p.name for p in cache.folder.iterdir()) == sorted([".build.lock", cache.path.name, cache.record.name])

    def test_failed_build_leaves_nothing(self, cache, monkeypatch):
        monkeypatch.setattr(_kernel, "_command", lambda: [*fast_command(), "-DNDROPE_BROKEN", "-include", "missing.h"])
        with pytest.raises(RuntimeError, match="failed"):
            _kernel.load()
        assert [p.name for p in cache.folder.iterdir()] == [".build.lock"]


def compiler_script(tmp: Path, body: str) -> Path:
    """An executable stand-in for the C++ compiler (``CXX``) running ``body`` (sh)."""
    script = tmp / "cxx"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


class TestBuildUnderLoad:
    def test_hung_compiler_is_killed_after_the_timeout_and_the_formula_serves(self, cache, monkeypatch):
        """A compiler that never returns (stuck distcc, an NFS ccache) costs the timeout, not forever:
        it is killed with its children, one warning names the timeout, the torch formula rotates."""
        pids = cache.tmp / "pids"
        # the "compiler" starts a child that would outlive a kill of the driver alone
        cxx = compiler_script(cache.tmp, f'sleep 60 & echo $! >> {pids}\necho $$ >> {pids}\nwait\n')
        monkeypatch.setenv("CXX", str(cxx))
        monkeypatch.setenv("NDROPE_BUILD_TIMEOUT", "1")
        monkeypatch.setattr(_kernel, "_library", None)
        monkeypatch.setattr(_kernel, "_failure", None)
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match="NDROPE_BUILD_TIMEOUT") as caught:
            assert _kernel.library() is None
        assert time.monotonic() - started < 20
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
        assert isinstance(_kernel.failure(), TimeoutError)
        for pid in map(int, pids.read_text().split()):
            for _ in range(100):  # the kill is immediate; reaping by init may take a moment
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"compiler process {pid} survived the timeout")
        x, theta = torch.randn(2, 3, 5, 8), torch.randn(5, 4)
        torch.testing.assert_close(ndrope.apply_rotary(x, theta), rotate_formula(x, theta.cos(), theta.sin(), "half"), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
    def test_bad_build_timeout_names_the_variable(self, monkeypatch, value):
        monkeypatch.setenv("NDROPE_BUILD_TIMEOUT", value)
        with pytest.raises(ValueError, match="NDROPE_BUILD_TIMEOUT"):
            _kernel.build_timeout()

    def test_cold_processes_build_once_and_share_the_verified_file(self, cache, tmp_path):
        """Four processes starting together: one compiler run, the others wait for its file."""
        runs = tmp_path / "runs"
        cxx = compiler_script(tmp_path, f'echo run >> {runs}\nexec {shutil.which("c++")} "$@"\n')
        program = textwrap.dedent(f"""
            from ndrope import _kernel
            _kernel._command = lambda: [{str(cxx)!r}, "-O0", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]
            lib = _kernel.load()
            print(_kernel.library_path())
        """)
        env = {**os.environ, "NDROPE_CACHE_DIR": str(cache.folder), "PYTHONPATH": str(Path(ndrope.__file__).parents[1])}
        processes = [
            subprocess.Popen([sys.executable, "-c", program], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        outputs = [process.communicate(timeout=300) for process in processes]
        assert [process.returncode for process in processes] == [0] * 4, [err[-2000:] for _, err in outputs]
        assert len({out.strip() for out, _ in outputs}) == 1
        assert runs.read_text().split() == ["run"], "each cold process compiled its own copy"
        building = [err for _, err in outputs if "building the C++ CPU rotary kernel" in err]
        assert len(building) == 1, "exactly the process that built says so"

    def test_scratch_folder_of_a_killed_build_is_removed_by_the_next(self, cache):
        cache.folder.mkdir(mode=0o700)
        stale = cache.folder / ".build-killed"
        stale.mkdir()
        (stale / cache.path.name).write_bytes(b"half a library")
        _kernel.load()
        assert not stale.exists() and is_recorded_build(cache)

    def test_first_build_says_where_and_reuse_is_silent(self, cache, caplog):
        with caplog.at_level("WARNING", logger="ndrope"):
            _kernel.load()
        assert [r.getMessage() for r in caplog.records] == [
            f"ndrope: building the C++ CPU rotary kernel once (a few seconds), into {cache.folder}"
        ]
        caplog.clear()
        with caplog.at_level("WARNING", logger="ndrope"):
            _kernel.load()
        assert caplog.records == []


class TestCacheLocation:
    @pytest.mark.parametrize("home", ["", "relative/home", "/"])
    def test_without_a_usable_home_the_cache_is_private_and_temporary(self, monkeypatch, home):
        """HOME='' as root used to put the cache in /.cache; now a per-user folder in the temporary directory."""
        monkeypatch.delenv("NDROPE_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", home)
        assert _kernel.cache_dir() == Path(tempfile.gettempdir()) / f"ndrope-{os.getuid()}"

    def test_unset_home_uses_the_temporary_directory(self, monkeypatch):
        monkeypatch.delenv("NDROPE_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.delenv("HOME", raising=False)
        assert _kernel.cache_dir().parent == Path(tempfile.gettempdir())

    def test_order_of_settings(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
        monkeypatch.delenv("NDROPE_CACHE_DIR", raising=False)
        assert _kernel.cache_dir() == tmp_path / "home" / ".cache" / "ndrope"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert _kernel.cache_dir() == tmp_path / "xdg" / "ndrope"
        monkeypatch.setenv("NDROPE_CACHE_DIR", str(tmp_path / "mine"))
        assert _kernel.cache_dir() == tmp_path / "mine"

    def test_a_temporary_cache_of_another_user_is_refused(self, monkeypatch, tmp_path):
        """Another user may have created /tmp/ndrope-<uid> first: it is not trusted (formula instead)."""
        folder = tmp_path / "planted"
        folder.mkdir(mode=0o700)
        monkeypatch.setenv("NDROPE_CACHE_DIR", str(folder))
        monkeypatch.setattr(os, "getuid", lambda: 12345)
        with pytest.raises(PermissionError, match="not to this user"):
            _kernel.load()
