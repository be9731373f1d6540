"""Rotation of q and k alone: ndrope against the copy bound and the peers, forward and forward+backward."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import ndrope

from . import peers
from .timing import measure

# name: (q/k shape (B, H, N, D), grid shape); the three workloads
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "1d": ((1, 32, 4096, 128), (4096,)),  # a 7B-class LLM layer at 4k context
    "2d": ((64, 6, 196, 64), (14, 14)),  # ViT-S/16 at 224, batch 64
    "3d": ((4, 12, 1568, 64), (8, 14, 14)),  # ViT-B video, 8 x 14 x 14 tubelets
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("forward", "forward+backward")


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


def run(shapes: Sequence[str], dtypes: Sequence[str], repeats: int, compile_peer: bool = True) -> list[dict[str, Any]]:
    """One row per (shape, dtype, pass, method): median ms, effective GB/s, ratio to the copy bound."""
    rows = []
    candidates = [peers.COPY, *peers.NDROPE, *(p for p in peers.PEERS if compile_peer or p is not peers.COMPILED)]
    for shape_name in shapes:
        shape, grid_shape = SHAPES[shape_name]
        freqs = ndrope.axial_frequencies(shape[-1], len(grid_shape), theta=100.0)
        theta = ndrope.angles(ndrope.grid(grid_shape), freqs)  # (N, P) float32, shared by heads and batch
        cos_sin = ndrope.cos_sin(theta)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            generator = torch.Generator().manual_seed(0)
            q, k, grad_q, grad_k = (torch.randn(shape, generator=generator).to(dtype) for _ in range(4))
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
                seconds = measure(cases, repeats)
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


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets: forward within 1.25x of the copy bound; forward+backward no slower than the best of
    (complex form, torch.compile of rotate_half). Ratios are paired by round (`paired_ratio`)."""
    found = []
    table = {(r["shape"], r["dtype"], r["passes"], r["method"]): r for r in rows}
    default_methods = [peer.name for peer in peers.NDROPE]
    for shape, dtype, passes, method in table:
        if method not in default_methods:
            continue
        mine = table[(shape, dtype, passes, method)]
        if passes == "forward":
            bound_name, bound_rows = "copy", [table[(shape, dtype, passes, peers.COPY.name)]]
        else:
            keys = [(shape, dtype, passes, peer.name) for peer in (peers.COMPLEX, peers.COMPILED)]
            bound_rows = [table[key] for key in keys if key in table]
            if not bound_rows:
                continue
            bound_name = "best of complex, compiled"
        ratio = paired_ratio(mine["rounds_ms"], [r["rounds_ms"] for r in bound_rows])
        of_medians = mine["ms"] / min(r["ms"] for r in bound_rows)
        found.append(
            dict(
                shape=shape, dtype=dtype, passes=passes, method=method, versus=bound_name,
                ratio=ratio, ratio_of_medians=of_medians, met=ratio <= (1.25 if passes == "forward" else 1.0),
            )
        )
    return found


def per_call(repeats: int = 2000) -> dict[str, float]:
    """Microseconds per call on a tiny (2, 4, 8, 64) float32 tensor, where the call's own cost shows:
    ``apply_rotary`` without and with autograd recording, against ``q * 1.5``. Best of 5 batches."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 64, generator=generator)
    q_grad = q.clone().requires_grad_()
    cos_sin = ndrope.cos_sin(torch.randn(8, 32, generator=generator))

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times.append((time.perf_counter() - start) / repeats)
        return min(times) * 1e6

    with torch.no_grad():
        plain = best(lambda: ndrope.apply_rotary(q, cos_sin))
        copy = best(lambda: q * 1.5)
    recorded = best(lambda: ndrope.apply_rotary(q_grad, cos_sin))
    return dict(apply_rotary_us=plain, apply_rotary_autograd_us=recorded, copy_us=copy)
