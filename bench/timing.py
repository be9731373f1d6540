"""Interleaved timing (`measure` by the wall clock, `measure_cuda` by CUDA events): every round runs
each candidate in turn, so load spikes on a shared machine hit all of them alike and ratios measured
in one run stay meaningful. The order rotates from round to round, so that no candidate always
inherits the caches and threads of the same predecessor."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Mapping


def measure(
    cases: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 1, settle: bool = True
) -> dict[str, dict[str, float]]:
    """Median and minimum wall time in seconds of each case over ``repeats`` interleaved rounds, and the
    time of every round (``rounds``, in round order, so that cases can be compared round by round).

    With ``settle`` a case runs twice per round and only the second call is timed: the first settles
    the caches and the allocator for that case (the L3 of these machines holds the whole working set,
    so the previous case's leftovers would otherwise decide the time). Results are released untimed.
    Round r runs the cases starting from the r-th (rotating), so each follows each other one alike.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:  # round r starts with case r (mod the number of cases)
            fn = cases[name]
            if settle:
                fn()  # its result is dropped at once
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if round_index >= warmup:
                times[name].append(elapsed)
    return {
        name: dict(median=statistics.median(values), min=min(values), rounds=values) for name, values in times.items()
    }


def measure_cuda(cases: Mapping[str, Callable[[], object]], repeats: int, *, calls: int = 10) -> dict[str, dict[str, float]]:
    """`measure` for CUDA work: each timed sample is ``calls`` back-to-back calls between two CUDA
    events (launch overhead overlaps the previous call's kernels, as in a model), divided by ``calls``.
    Same rounds, rotation and results as `measure`; one untimed call settles each case per round."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for round_index in range(1 + repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = cases[name]
            fn()
            start.record()
            for _ in range(calls):
                result = fn()
                del result
            end.record()
            end.synchronize()
            if round_index >= 1:
                times[name].append(start.elapsed_time(end) / 1e3 / calls)
    return {
        name: dict(median=statistics.median(values), min=min(values), rounds=values) for name, values in times.items()
    }


def warm_allocator() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS (no mmap, no trim).

    By default each large tensor is a fresh mmap whose pages the kernel faults in and zeroes on first
    write: that costs more than the copy itself (8 ms against 1.5 ms for the 2d case) and would hide the
    differences being measured. Returns False when the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
