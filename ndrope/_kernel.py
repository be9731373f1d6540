"""The CPU rotary kernel (`csrc/rotary.cpp`): built on first use, verified before it is loaded.

The library has a plain C ABI and no torch headers, so the system compiler builds it in a few
seconds (about 4 s on a 2-core AMD EPYC; one log line says so). It is cached in `cache_dir`
(``$NDROPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ndrope``, else ``~/.cache/ndrope``, else a private
folder in the temporary directory when HOME is unset or empty) under a name keyed by the source, the
compiler command and the CPU's ISA, next to a ``.sha256`` file the build writes.

* Processes that start cold together build once: the build runs under an exclusive lock on the cache
  folder, and the others wait for it and load the file it verified.
* The compiler runs under a timeout (``$NDROPE_BUILD_TIMEOUT`` seconds, default
  `DEFAULT_BUILD_TIMEOUT_S`): a compiler that hangs is killed with its process group, and ndrope
  falls back to the torch formula. Scratch folders of a build that was killed are removed by the next.

A cached library is loaded only when

* the cache folder and the file belong to this user and nobody else may write to them, and
* the file's SHA-256 equals the one recorded by the build (a truncated or replaced file is rebuilt),

and once loaded, only when its ABI (version, struct size, every field offset) equals the ctypes
mirror below. Anything else falls back to the plain torch formula with one warning (`library`
returns None); nothing unexpected is ever executed or trusted silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "rotary.cpp"
ABI_VERSION = 3
#: Seconds the compiler may run (and another process's build may be waited for), unless
#: ``$NDROPE_BUILD_TIMEOUT`` says otherwise: a build takes a few seconds, a loaded machine a minute.
DEFAULT_BUILD_TIMEOUT_S = 180.0
_log = logging.getLogger(__name__)
#: Row dims (x.dim() - 1) the kernel accepts; higher ranks take the torch formula.
MAX_ROW_DIMS = 16
_MAX_OPERANDS = 7
_STATUS = {
    1: "unsupported x dtype",
    2: "unsupported cos/sin dtype",
    3: "too many dims",
    4: "ABI version mismatch",
    5: "wrong operands",
    6: "inconsistent shape",
}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
TABLE_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
# Explicit ISA flags rather than -march=native: the cached file is keyed by this capability, so a cache
# shared by different CPUs never runs instructions a CPU lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


class _Operand(ctypes.Structure):
    # pointers are c_void_p here (a plain int to set, no ctypes cast per call); the C side types them
    _fields_ = [("data", ctypes.c_void_p), ("strides", ctypes.c_void_p)]


class _RotaryCall(ctypes.Structure):
    """Mirror of `RotaryCall` in csrc/rotary.cpp, field for field (checked against the library)."""

    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("x_dtype", ctypes.c_int32),
        ("table_dtype", ctypes.c_int32),
        ("interleaved", ctypes.c_int32),
        ("inverse", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("ndim", ctypes.c_int64),
        ("pairs", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("sizes", ctypes.c_void_p),
        ("n_operands", ctypes.c_int64),
        ("stream_bytes", ctypes.c_int64),
        ("operands", _Operand * _MAX_OPERANDS),
    ]


def expected_abi() -> tuple[int, ...]:
    """What `ndrope_abi` must report: version, struct sizes and field offsets, as the ctypes mirror has them."""
    fields = [name for name, _ in _RotaryCall._fields_]
    return (
        ABI_VERSION,
        ctypes.sizeof(_RotaryCall),
        ctypes.sizeof(_Operand),
        *(getattr(_RotaryCall, name).offset for name in fields),
        _Operand.data.offset,
        _Operand.strides.offset,
    )


def cache_dir() -> Path:
    """Where built kernels are kept: ``$NDROPE_CACHE_DIR``, ``$XDG_CACHE_HOME/ndrope``, ``~/.cache/ndrope``,
    or, when HOME is unset, empty or relative (a service, ``HOME=''`` as root), ``<tmp>/ndrope-<uid>``:
    never a system path such as ``/.cache``."""
    root = os.environ.get("NDROPE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores relative paths
        return Path(xdg) / "ndrope"
    home = os.environ.get("HOME", "")
    if os.path.isabs(home) and home.rstrip("/"):
        return Path(home) / ".cache" / "ndrope"
    return Path(tempfile.gettempdir()) / f"ndrope-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def build_timeout() -> float:
    """Seconds allowed for one build: ``$NDROPE_BUILD_TIMEOUT`` or `DEFAULT_BUILD_TIMEOUT_S`."""
    text = os.environ.get("NDROPE_BUILD_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"NDROPE_BUILD_TIMEOUT={text!r} must be a positive number of seconds")
    return value


def _private(path: Path, kind: str) -> None:
    """Raise unless ``path`` belongs to this user and nobody else can write to it."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{kind} {path} is a symbolic link")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{kind} {path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{kind} {path} is writable by others (mode {stat.filemode(info.st_mode)})")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def _command() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = list(_ISA_FLAGS.get(capability, []))
    if capability == "AVX512" and "avx512_bf16" in _cpu_flags():
        flags.append("-mavx512bf16")  # one-instruction bfloat16 rounding (vcvtne2ps2bf16)
    return [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *flags]


def library_path() -> Path:
    """Where the library for this source, compiler command and CPU lives in the cache."""
    command = _command()
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *command]).encode()).hexdigest()[:16]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return cache_dir() / f"rotary_{capability}_{digest}.so"


def _compile(command: list[str], timeout: float) -> None:
    """Run the compiler in a session of its own; past ``timeout`` kill it with everything it started
    (cc1plus, as, ld), not only the driver."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise TimeoutError(
            f"{' '.join(command[:2])} ... did not finish within {timeout:g} s (NDROPE_BUILD_TIMEOUT); killed"
        ) from None
    except BaseException:  # Ctrl-C while compiling: leave no compiler behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")


def _build(target: Path) -> None:
    """Compile into a scratch folder beside ``target``, record the hash, then rename both into place."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        built = Path(scratch) / target.name
        _compile([*_command(), str(SOURCE), "-o", str(built)], build_timeout())
        digest = Path(scratch) / "digest"
        digest.write_text(_sha256(built))
        for file in (built, digest):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(built, target)  # a reader never sees a partial file
        os.replace(digest, target.with_suffix(".sha256"))


def _verified(path: Path) -> bool:
    """Whether the cached ``path`` is this user's, private, and the very file the build recorded."""
    record = path.with_suffix(".sha256")
    if not path.exists() or not record.exists():
        return False
    _private(path, "cached kernel")
    _private(record, "kernel hash record")
    return record.read_text().strip() == _sha256(path)


@contextlib.contextmanager
def _build_lock(folder: Path, timeout: float) -> Iterator[None]:
    """Hold the cache folder's exclusive build lock (released by the kernel if the process dies).
    Waits at most ``timeout`` plus a minute for a build in another process."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds are still atomic, only not shared
        yield
        return
    handle = os.open(folder / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout + 60.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has been building the kernel in {folder} for over {timeout + 60:g} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(handle)  # releases the lock


def _remove_stale_scratch(folder: Path) -> None:
    """Scratch folders left by a build that was killed (only the lock holder builds, so any is stale)."""
    for scratch in folder.glob(".build-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def load() -> ctypes.CDLL:
    """Build (or reuse) the verified library and load it; raises on anything unexpected."""
    path = library_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _private(path.parent, "kernel cache folder")
    if not _verified(path):
        timeout = build_timeout()
        with _build_lock(path.parent, timeout):
            if not _verified(path):  # nobody built it while we waited
                _remove_stale_scratch(path.parent)
                _log.warning("ndrope: building the C++ CPU rotary kernel once (a few seconds), into %s", path.parent)
                _build(path)
                if not _verified(path):
                    raise RuntimeError(f"the freshly built {path} does not match its recorded hash")
    lib = ctypes.CDLL(str(path))
    lib.ndrope_abi.restype = ctypes.c_int64
    lib.ndrope_abi.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    for function in (lib.ndrope_rotate, lib.ndrope_rotate_backward):
        function.restype = ctypes.c_int32
        function.argtypes = [ctypes.POINTER(_RotaryCall)]
    check_abi(lib)
    return lib


def check_abi(lib: ctypes.CDLL) -> None:
    """Raise unless the library's `RotaryCall` layout is exactly the ctypes mirror's."""
    expected = expected_abi()
    buffer = (ctypes.c_int64 * 64)()
    count = lib.ndrope_abi(buffer, len(buffer))
    reported = tuple(buffer[: min(count, len(buffer))])
    if reported != expected:
        raise RuntimeError(
            f"the rotary library's ABI {reported} differs from ndrope's {expected} "
            "(version, sizeof RotaryCall, sizeof Operand, field offsets): rebuild it or reinstall ndrope"
        )


_library: ctypes.CDLL | None = None
_failure: BaseException | None = None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (after one warning) where it cannot be built or trusted."""
    global _library, _failure
    if _library is None and _failure is None:
        try:
            _library = load()
        except Exception as error:  # no compiler, no OpenMP, untrusted cache, ABI mismatch, ...
            _failure = error
            warnings.warn(
                f"ndrope: the C++ CPU rotary kernel is unavailable, using the torch formula instead ({error})",
                RuntimeWarning,
                stacklevel=2,
            )
    return _library


def failure() -> BaseException | None:
    """Why `library` returned None (None while it loaded, or before the first call)."""
    return _failure


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest data cache of CPU 0 as Linux reports it in /sys, 0 where unknown.

    The kernel writes outputs that, with their input, exceed it with non-temporal stores. /sys rather
    than sysconf: in virtual machines glibc's CPUID-based figure can be the host's whole L3 (320 MB for
    this machine's 32 MB)."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            value = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except ValueError:
            continue
        largest = max(largest, value)
    return largest


def _row_strides(tensor: Tensor | None, rows: int) -> tuple[int, ...]:
    """The element strides of ``tensor`` (..., last) over x's ``rows`` row dims, as if expanded to
    them: 0 on the dims it broadcasts over (missing or size 1), and 0 everywhere for None."""
    if tensor is None:
        return (0,) * rows
    shape, stride = tensor.shape[:-1], tensor.stride()[:-1]
    if len(shape) == rows and 1 not in shape:
        return stride  # x-shaped (the common case, a few hundred nanoseconds)
    if len(shape) > rows:
        raise ValueError(f"an operand of shape {tuple(tensor.shape)} has more row dims than x's {rows}")
    return (0,) * (rows - len(shape)) + tuple(0 if size == 1 else step for size, step in zip(shape, stride))


class _Template:
    """A filled-in RotaryCall for one geometry; each call copies it and adds the data pointers."""

    __slots__ = ("call", "numbers")

    def __init__(self, call: _RotaryCall, numbers: ctypes.Array) -> None:
        self.call, self.numbers = call, numbers  # numbers: the sizes and strides the call points into


_TEMPLATES: dict[tuple, _Template] = {}
_MAX_TEMPLATES = 256


def run(entry: str, x: Tensor, table_dtype: torch.dtype, interleaved: bool, inverse: bool, operands: list) -> None:
    """Run one call over x's rows. ``operands`` are tensors (or None) broadcastable to x's rows with
    their own last dim (x.shape[:-1] + (D or P,)); the call reads and writes their data in place."""
    lib = library()
    rows = x.dim() - 1
    sizes = tuple(x.shape[:-1])
    strides = tuple(_row_strides(tensor, rows) for tensor in operands)
    pairs = operands[2 if entry == "ndrope_rotate_backward" else 1].shape[-1]
    threads, stream_bytes = torch.get_num_threads(), last_level_cache_bytes()
    key = (entry, x.dtype, table_dtype, interleaved, inverse, threads, sizes, strides, pairs, x.shape[-1], stream_bytes)
    template = _TEMPLATES.get(key)
    if template is None:
        numbers = (ctypes.c_int64 * max(rows * (len(operands) + 1), 1))(*sizes, *(n for s in strides for n in s))
        base = ctypes.addressof(numbers)
        call = _RotaryCall(
            ABI_VERSION, DTYPE_CODES[x.dtype], TABLE_DTYPE_CODES[table_dtype], int(interleaved), int(inverse),
            threads, rows, pairs, x.shape[-1], base, len(operands), stream_bytes,
        )
        for index in range(len(operands)):
            call.operands[index].strides = base + 8 * rows * (index + 1)
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = _Template(call, numbers)
    call = _RotaryCall.from_buffer_copy(template.call)  # per call: threads may run calls concurrently
    targets = call.operands
    for index, tensor in enumerate(operands):
        targets[index].data = tensor.data_ptr() if tensor is not None else None
    status = getattr(lib, entry)(ctypes.byref(call))
    del template  # the numbers the call pointed into stayed alive until here
    if status != 0:
        shapes = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in operands if t is not None)
        raise RuntimeError(f"{entry} refused the call: {_STATUS.get(status, status)} ({shapes})")
