"""Rotation of q and k alone: ndrope against the copy bound and the peers, forward and forward+backward,
on CPU (`SHAPES`, `peers.CPU_PEERS`) or on a CUDA device (`CUDA_SHAPES`, `peers.CUDA_PEERS`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

import ndrope

from . import peers
from .timing import measure, measure_cuda

# name: (q/k shape (B, H, N, D), grid shape); the three workloads
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "1d": ((1, 32, 4096, 128), (4096,)),  # a 7B-class LLM layer at 4k context
    "2d": ((64, 6, 196, 64), (14, 14)),  # ViT-S/16 at 224, batch 64
    "3d": ((4, 12, 1568, 64), (8, 14, 14)),  # ViT-B video, 8 x 14 x 14 tubelets
}
# on a GPU: the ViT-B/16 (batch 256), video (8 x 14 x 14 tubelets, batch 8) and a 7B-class LLM at 8k
CUDA_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "vit-b16": ((256, 12, 196, 64), (14, 14)),
    "video": ((8, 12, 1568, 64), (8, 14, 14)),
    "llm": ((1, 32, 8192, 128), (8192,)),
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("forward", "forward+backward")


class Targets(NamedTuple):
    """What ndrope's eager rotation must meet: forward within ``forward_limit`` x the copy bound's time
    (for ``forward_dtypes``), forward+backward no slower than the fastest of ``backward_peers``."""

    forward_limit: float
    forward_dtypes: tuple[str, ...]
    backward_peers: tuple[peers.Peer, ...]


TARGETS = {
    "cpu": Targets(1.25, tuple(DTYPES), (peers.COMPLEX, peers.COMPILED)),
    # >= 0.85 of the copy bound's bandwidth in bfloat16; no slower than Liger's and the compiled formula
    "cuda": Targets(1 / 0.85, ("bfloat16",), (peers.LIGER, peers.COMPILED)),
}


def shapes_for(device: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return CUDA_SHAPES if device == "cuda" else SHAPES


def _forward(apply: peers.Apply, q: Tensor, k: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    def run() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return apply(q, k)

    return run


def _forward_backward(
    apply: peers.Apply, q: Tensor, k: Tensor, grad_q: Tensor, grad_k: Tensor
) -> Callable[[], tuple[Tensor, ...]]:
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()

    def run() -> tuple[Tensor, ...]:
        out_q, out_k = apply(q, k)
        torch.autograd.backward((out_q, out_k), (grad_q, grad_k))
        grads = (q.grad, k.grad)
        q.grad = k.grad = None
        return grads

    return run


def _check(peer: peers.Peer, apply: peers.Apply, q: Tensor, k: Tensor, cos_sin: tuple[Tensor, Tensor]) -> None:
    """Every candidate must compute the same rotation, else the comparison means nothing."""
    if peer.layout == "-":
        return
    with torch.no_grad():
        got = apply(q, k)
    exact = tuple(t.double() for t in cos_sin)
    for x, out in zip((q, k), got):
        expected = ndrope.apply_rotary(x.double(), exact, layout=peer.layout)  # float64: the peers must agree
        error = (out.float() - expected.float()).abs().max().item()
        if error > (1e-4 if q.dtype == torch.float32 else 0.1):
            raise RuntimeError(f"{peer.name} disagrees with ndrope's reference ({peer.layout}): max error {error:.3g}")


def run(
    shapes: Sequence[str], dtypes: Sequence[str], repeats: int, compile_peer: bool = True, device: str = "cpu"
) -> list[dict[str, Any]]:
    """One row per (shape, dtype, pass, method): median ms, effective GB/s, ratio to the copy bound."""
    rows = []
    others = peers.CUDA_PEERS if device == "cuda" else peers.CPU_PEERS
    candidates = [peers.COPY, *peers.NDROPE, *(p for p in others if compile_peer or p not in peers.COMPILING)]
    timer = measure_cuda if device == "cuda" else measure
    for shape_name in shapes:
        shape, grid_shape = shapes_for(device)[shape_name]
        freqs = ndrope.axial_frequencies(shape[-1], len(grid_shape), theta=100.0, device=device)
        theta = ndrope.angles(ndrope.grid(grid_shape, device=device), freqs)  # (N, P) float32, shared by heads and batch
        cos_sin = ndrope.cos_sin(theta)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            generator = torch.Generator().manual_seed(0)
            q, k, grad_q, grad_k = (torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(4))
            torch.compiler.reset()  # a fresh cache per workload: the recompile limit (8) must not send peers to eager
            applies = {}
            for peer in candidates:
                try:
                    applies[peer.name] = peer.make(theta, dtype)
                except ImportError as error:
                    print(f"  skipping {peer.name}: {error}")
                    continue
                _check(peer, applies[peer.name], q, k, cos_sin)
            bytes_moved = 2 * 2 * q.numel() * q.element_size()  # q and k, read once + written once
            for pass_name in PASSES:
                if pass_name == "forward":
                    cases = {name: _forward(apply, q, k) for name, apply in applies.items()}
                else:
                    cases = {name: _forward_backward(apply, q, k, grad_q, grad_k) for name, apply in applies.items()}
                seconds = timer(cases, repeats)
                traffic = bytes_moved * (1 if pass_name == "forward" else 2)
                copy = seconds[peers.COPY.name]["median"]
                for name, value in seconds.items():
                    rows.append(
                        dict(
                            shape=shape_name, size=list(shape), dtype=dtype_name, passes=pass_name, method=name,
                            ms=value["median"] * 1e3, min_ms=value["min"] * 1e3,
                            gb_per_s=traffic / value["median"] / 1e9, x_copy=value["median"] / copy,
                            rounds_ms=[t * 1e3 for t in value["rounds"]],
                        )
                    )
    return rows


def paired_ratio(mine: Sequence[float], bounds: Sequence[Sequence[float]]) -> float:
    """Median over rounds of mine / (the fastest bound in that round).

    Each round times every case back to back, so a load spike from another process on a shared machine
    slows a round's cases alike; ratios taken within a round cancel it, where a ratio of two medians
    over the whole run would not."""
    return statistics.median(m / min(b) for m, b in zip(mine, zip(*bounds)))


def targets(rows: list[dict[str, Any]], device: str = "cpu") -> list[dict[str, Any]]:
    """The device's `TARGETS` for ndrope's eager rotations; ratios are paired by round (`paired_ratio`).
    Targets whose bound was not measured (a peer not installed, --skip-compile) are left out."""
    found = []
    goal = TARGETS[device]
    table = {(r["shape"], r["dtype"], r["passes"], r["method"]): r for r in rows}
    default_methods = [peer.name for peer in peers.NDROPE]
    for shape, dtype, passes, method in table:
        if method not in default_methods:
            continue
        mine = table[(shape, dtype, passes, method)]
        if passes == "forward":
            if dtype not in goal.forward_dtypes:
                continue
            bound_name, bound_rows, limit = "copy", [table[(shape, dtype, passes, peers.COPY.name)]], goal.forward_limit
        else:
            keys = [(shape, dtype, passes, peer.name) for peer in goal.backward_peers]
            bound_rows = [table[key] for key in keys if key in table]
            if not bound_rows:
                continue
            bound_name, limit = "best of " + ", ".join(r["method"] for r in bound_rows), 1.0
        ratio = paired_ratio(mine["rounds_ms"], [r["rounds_ms"] for r in bound_rows])
        of_medians = mine["ms"] / min(r["ms"] for r in bound_rows)
        found.append(
            dict(
                shape=shape, dtype=dtype, passes=passes, method=method, versus=bound_name,
                ratio=ratio, ratio_of_medians=of_medians, limit=limit, met=ratio <= limit,
            )
        )
    return found


def compiled_choices(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and pass, which `ndrope.CompiledRotation` ran faster under torch.compile."""
    kernel, formula = (peer.name for peer in peers.NDROPE_COMPILED)
    table = {(r["shape"], r["dtype"], r["passes"], r["method"]): r for r in rows}
    found = []
    for shape, dtype, passes, method in table:
        if method != kernel or (shape, dtype, passes, formula) not in table:
            continue
        ratio = paired_ratio(table[(shape, dtype, passes, kernel)]["rounds_ms"], [table[(shape, dtype, passes, formula)]["rounds_ms"]])
        found.append(dict(shape=shape, dtype=dtype, passes=passes, kernel_over_formula=ratio, faster="kernel" if ratio <= 1 else "formula"))
    return found


def per_call(repeats: int = 2000, device: str = "cpu") -> dict[str, float]:
    """Microseconds per call on a tiny (2, 4, 8, 64) float32 tensor, where the call's own cost shows:
    ``apply_rotary`` without and with autograd recording, against ``q * 1.5``. Best of 5 batches (on
    CUDA each batch ends with a synchronisation, so this is the cost of issuing the launches)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 64, generator=generator).to(device)
    q_grad = q.clone().requires_grad_()
    cos_sin = ndrope.cos_sin(torch.randn(8, 32, generator=generator).to(device))
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            synchronize()
            times.append((time.perf_counter() - start) / repeats)
        return min(times) * 1e6

    with torch.no_grad():
        plain = best(lambda: ndrope.apply_rotary(q, cos_sin))
        copy = best(lambda: q * 1.5)
    recorded = best(lambda: ndrope.apply_rotary(q_grad, cos_sin))
    return dict(apply_rotary_us=plain, apply_rotary_autograd_us=recorded, copy_us=copy)
