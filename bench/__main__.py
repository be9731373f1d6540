"""`python -m bench`: rotation speed against the copy bound and peers, then a ViT training step.

Quick run: ``python -m bench --repeats 5 --shapes 2d --dtypes float32 --skip-vit``.
On a GPU: ``python -m bench --device cuda`` (shapes vit-b16, video, llm; a compiled ViT-B/16 step).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

import ndrope
import ndrope._kernel
import ndrope._ops
from training.files import atomic_write

from . import rotary, vit_step
from .timing import warm_allocator


def _names(choices: dict[str, Any]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        bad = [name for name in names if name not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (comma-separated)")
        return names

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per rotation case (median; default 15)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu (the C++ kernel) or cuda (the Triton kernel, GPU shapes and peers); default cpu",
    )
    all_shapes = {**rotary.SHAPES, **rotary.CUDA_SHAPES}
    parser.add_argument(
        "--shapes", type=_names(all_shapes), default=None,
        help=f"comma-separated; cpu from {','.join(rotary.SHAPES)}, cuda from {','.join(rotary.CUDA_SHAPES)} (all)",
    )
    parser.add_argument(
        "--dtypes", type=_names(rotary.DTYPES), default=list(rotary.DTYPES), help="from float32,bfloat16 (both)"
    )
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peer (saves ~30 s)")
    parser.add_argument("--skip-rotary", action="store_true", help="ViT training step only")
    parser.add_argument(
        "--vit", type=_names(vit_step.CONFIGS), default=list(vit_step.CONFIGS), help="cpu: from tiny-32px,small-224 (both); cuda: ViT-B/16"
    )
    parser.add_argument("--vit-repeats", type=int, default=5, help="timed training steps per ViT (median; default 5)")
    parser.add_argument("--skip-vit", action="store_true", help="rotation benchmark only")
    parser.add_argument("--cold-alloc", action="store_true", help="keep glibc's default mmap/trim (page faults timed)")
    parser.add_argument("--out", help="also write the results as JSON to this path (atomically)")
    return parser


def _machine(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        kernels = ndrope._ops.gpu_kernels()
        ndrope_kernel = "Triton GPU kernel" if kernels is not None else f"torch formula ({ndrope._ops._gpu_failure})"
    else:
        kernel = ndrope._kernel.library()
        ndrope_kernel = "C++ CPU kernel" if kernel is not None else f"torch formula ({ndrope._kernel.failure()})"
    machine = dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(), python=platform.python_version(),
        device=device, ndrope_kernel=ndrope_kernel,
    )
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine.update(
            gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda, triton=_version("triton"),
            liger_kernel=_version("liger-kernel"), flash_attn=_version("flash-attn"),
        )
    return machine


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _print_rotary(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["method"]) for r in rows)
    blocks: dict[tuple[str, str], dict[str, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        blocks.setdefault((r["shape"], r["dtype"]), {}).setdefault(r["method"], {})[r["passes"]] = r
    for (shape, dtype), methods in blocks.items():
        size = next(iter(methods.values()))["forward"]["size"]
        print(f"\n{shape} q, k {tuple(size)} {dtype}")
        print(f"{'':{width}}  {'forward':>22}  {'forward+backward':>22}")
        print(f"{'method':{width}}  {'ms':>7} {'GB/s':>6} {'x copy':>7}  {'ms':>7} {'GB/s':>6} {'x copy':>7}")
        for method, passes in methods.items():
            cells = [f"{p['ms']:7.2f} {p['gb_per_s']:6.1f} {p['x_copy']:7.2f}" for p in map(passes.get, rotary.PASSES)]
            print(f"{method:{width}}  " + "  ".join(cells))


def _print_targets(found: list[dict[str, Any]], device: str) -> None:
    goal = rotary.TARGETS[device]
    forward = f"forward <= {goal.forward_limit:.2f}x the copy bound's time ({', '.join(goal.forward_dtypes)})"
    backward = "forward+backward <= 1.0x the fastest of " + ", ".join(peer.name for peer in goal.backward_peers)
    print(f"\ntargets (ndrope time / bound, the median of per-round ratios; {forward}, {backward}; in brackets the ratio of the medians)")
    for t in found:
        verdict = "met" if t["met"] else "NOT MET"
        where = f"{t['passes']:16} {t['shape']:7} {t['dtype']:8} {t['method']:18}"
        print(f"  {where} {t['ratio']:5.2f}x ({t['ratio_of_medians']:4.2f}) vs {t['versus']}: {verdict}")


def _print_compiled_choices(found: list[dict[str, Any]]) -> None:
    if not found:
        return
    print("\nunder torch.compile, ndrope half with set_compiled_rotation('kernel') / ('formula'), paired by round:")
    for c in found:
        print(f"  {c['passes']:16} {c['shape']:7} {c['dtype']:8} kernel / formula {c['kernel_over_formula']:5.2f}x: {c['faster']} faster")


def _print_vit_cuda(rows: list[dict[str, Any]]) -> None:
    print("\ncompiled ViT-B/16 training step (bfloat16 autocast, AdamW), against the same step with timm's formula")
    for r in rows:
        verdict = "" if r["met"] is None else (f"limit {r['limit']:.2f}: " + ("met" if r["met"] else "NOT MET"))
        print(f"  {r['case']:28} {r['ms']:8.1f} ms  {r['x_timm']:5.3f}x timm  {verdict}")


def _print_vit(rows: list[dict[str, Any]]) -> None:
    print("\nViT training step (forward + cross-entropy + backward + AdamW); ratios of medians (and of minima)")
    header = f"{'config':10} {'batch':>5} {'pos_embed':10} {'ms/step':>8} {'x learned':>15} {'limit':>6}"
    print(f"{header}          per forward")
    for r in rows:
        limit = "" if r["limit"] is None else f"{r['limit']:.2f}"
        verdict = "" if r["met"] is None else ("met" if r["met"] else "NOT MET")
        tables, rotations = r["angle_tables_per_forward"], r["rotations_per_forward"]
        counts = f"{tables} angle tables, {rotations} rotations ({r['depth']} blocks)"
        ratios = f"{r['x_learned']:.3f} ({r['x_learned_min']:.3f})"
        row = f"{r['config']:10} {r['batch']:5} {r['pos_embed']:10} {r['ms']:8.1f} {ratios:>15} {limit:>6}"
        print(f"{row} {verdict:8} {counts}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    # torch.compile imports cpp_extension, which warns about CUDA_HOME on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.repeats < 1 or args.vit_repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} and --vit-repeats={args.vit_repeats} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    shapes = rotary.shapes_for(args.device)
    if args.shapes is None:
        args.shapes = list(shapes)
    elif unknown := [name for name in args.shapes if name not in shapes]:
        raise SystemExit(f"--shapes {','.join(unknown)}: not a {args.device} shape; choose from {','.join(shapes)}")
    start = time.perf_counter()
    warm = not args.cold_alloc and warm_allocator()
    machine = dict(
        _machine(args.device), allocator="warm (glibc mallopt: no mmap, no trim)" if warm else "default",
        load_average_before=os.getloadavg()[0],
    )
    where = f", {machine['gpu']}" if args.device == "cuda" else ""
    print(
        f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} threads, torch {machine['torch']} "
        f"({machine['cpu_capability']}){where}\nndrope rotation: {machine['ndrope_kernel']}; "
        f"allocator: {machine['allocator']}; median of {args.repeats} interleaved rounds"
    )
    payload: dict[str, Any] = dict(machine=machine, args=vars(args))
    if not args.skip_rotary:
        rows = rotary.run(args.shapes, args.dtypes, args.repeats, compile_peer=not args.skip_compile, device=args.device)
        _print_rotary(rows)
        payload.update(
            rotary=rows, targets=rotary.targets(rows, args.device), compiled_choices=rotary.compiled_choices(rows),
            per_call=rotary.per_call(device=args.device),
        )
        _print_targets(payload["targets"], args.device)
        _print_compiled_choices(payload["compiled_choices"])
        cost = payload["per_call"]
        print(
            f"\nper call, (2, 4, 8, 64) float32 on {args.device}: apply_rotary {cost['apply_rotary_us']:.1f} us, "
            f"with autograd {cost['apply_rotary_autograd_us']:.1f} us; q * 1.5 {cost['copy_us']:.1f} us"
        )
    if args.skip_vit:
        payload["vit"] = {"skipped": "--skip-vit"}
    elif (reason := vit_step.unavailable()) is not None:
        print(f"\nViT training step: skipped, {reason}")
        payload["vit"] = {"skipped": reason}
    elif args.device == "cuda":
        payload["vit"] = vit_step.run_cuda(args.vit_repeats)
        _print_vit_cuda(payload["vit"])
    else:
        payload["vit"] = vit_step.run(args.vit, args.vit_repeats)
        _print_vit(payload["vit"])
    payload["seconds"] = time.perf_counter() - start
    machine["load_average_after"] = os.getloadavg()[0]
    before, after = machine["load_average_before"], machine["load_average_after"]
    print(f"\ntotal {payload['seconds']:.0f} s; 1-minute load average {before:.1f} before, {after:.1f} after")
    others = max(before, after - machine["torch_threads"])
    if others > 0.5:  # this run itself keeps about torch_threads cores busy
        print("warning: other processes were busy on this machine; ratios measured while they ran are unreliable")
    if args.out:
        atomic_write(args.out, json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
