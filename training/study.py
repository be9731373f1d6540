"""The position-encoding study: train each pos_embed variant x seed on one budget, test at every resolution, report.

    python train.py study --config configs/study_fashion_mnist.yaml [--seeds "[0, 1, 2]"] [-- FIT OPTIONS]

Each run is the public CLI in a subprocess (so DDP runs as it does for ``train.py fit``)::

    train.py fit  --config <fit_config> --model.net.pos_embed <variant> --seed_everything <seed>
                  --trainer.default_root_dir <output_dir>/runs/<variant>-seed<seed> <fit_args>
    train.py test --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
                  --model.eval_resolutions <eval_resolutions> [--model.resolution_mode <mode>]

Every run is tested with its final weights (the EMA weights when EMA is on), never a checkpoint picked on
the test split; RoPE variants once per entry of ``resolution_modes``. A rerun of the same command skips
finished steps and resumes unfinished fits from last.ckpt. The report goes to
``<output_dir>/results.json``, ``results.md`` and ``accuracy_vs_resolution.png``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import vit
from jsonargparse import CLI
from jsonargparse.typing import Path_fr

from ndrope.modules import ResolutionMode

from .cli import cli_main
from .report import atomic_write, write_study_report

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def check_study_args(variants: Sequence[str], seeds: Sequence[int], eval_resolutions: Sequence[int]) -> None:
    """Raise ValueError naming the argument when a list is empty, repeats an entry or names an unknown variant."""
    for name, values in (("variants", variants), ("seeds", seeds), ("eval_resolutions", eval_resolutions)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name}={list(values)} must be a non-empty list without repeats")
    unknown = [v for v in variants if v not in vit.POS_EMBED_CHOICES]
    if unknown:
        raise ValueError(
            f"variants={list(variants)}: unknown pos_embed {unknown}; choose from {list(vit.POS_EMBED_CHOICES)}"
        )


def fit_command(
    fit_config: Sequence[str], variant: str, seed: int, run_dir: Path, fit_args: Sequence[str]
) -> list[str]:
    """The ``train.py fit`` arguments of one run (without the interpreter and script)."""
    configs = [arg for path in fit_config for arg in ("--config", path)]
    return [
        "fit", *configs, "--model.net.pos_embed", variant, "--seed_everything", str(seed),
        "--trainer.default_root_dir", os.fspath(run_dir), *fit_args,
    ]


def test_command(run_dir: Path, eval_resolutions: Sequence[int], mode: Optional[str]) -> list[str]:
    """The ``train.py test`` arguments that evaluate a finished run's last.ckpt at every resolution.

    Results land in ``<run_dir>/test/`` (the model's default resolution mode) or ``<run_dir>/test-<mode>/``.
    """
    args = [
        "test", "--config", os.fspath(run_dir / "config.yaml"),
        "--ckpt_path", os.fspath(run_dir / "checkpoints" / "last.ckpt"),
        "--model.eval_resolutions", json.dumps(list(eval_resolutions)),
    ]
    return args + (["--model.resolution_mode", mode] if mode else [])


def modes_for(variant: str, resolution_modes: Optional[Sequence[str]]) -> list[Optional[str]]:
    """The resolution modes a variant is tested with: only RoPE has a choice of coordinates at other grids."""
    return list(resolution_modes) if resolution_modes and "rope" in variant else [None]


def _run(args: list[str], what: str) -> float:
    """Run ``train.py args`` in a subprocess with the output passed through; returns its wall time in seconds."""
    command = [sys.executable, os.fspath(TRAIN_SCRIPT), *args]
    print(f"[study] {what}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command).returncode
    if code:
        raise RuntimeError(f"[study] {what} failed (exit code {code}); run the study command again to resume")
    return time.perf_counter() - start


def run_study(
    fit_config: list[Path_fr],
    variants: list[str],
    eval_resolutions: list[int],
    seeds: Sequence[int] = (0,),
    resolution_modes: Optional[list[ResolutionMode]] = None,
    output_dir: str = "reports/study",
    fit_args: Sequence[str] = (),
    dry_run: bool = False,
) -> Optional[dict[str, Path]]:
    """Train and test every variant x seed, then write the study report; returns the report files.

    Args:
        fit_config: ``train.py fit`` config file(s) shared by all runs (paths in a study YAML are relative to it).
        variants: ``pos_embed`` names to compare (`vit.POS_EMBED_CHOICES`).
        eval_resolutions: test resolutions (multiples of the patch size).
        seeds: one run per variant and seed; the report gives mean ± std over seeds.
        resolution_modes: test RoPE variants once per `vit.set_resolution_mode` mode (rows
            "rope_axial (interpolate)", ...); None tests once with the model's default.
        output_dir: report folder; runs go to ``<output_dir>/runs/<variant>-seed<seed>``.
        fit_args: extra ``train.py fit`` options for every run, e.g. ``["--trainer.max_epochs=2"]``;
            options after ``--`` on the command line are appended.
        dry_run: check every run's configuration and print the commands, without training.
    """
    check_study_args(variants, seeds, eval_resolutions)
    if resolution_modes is not None and len(set(resolution_modes)) != len(resolution_modes):
        raise ValueError(f"resolution_modes={list(resolution_modes)} must not repeat a mode")
    configs = [os.fspath(path) for path in fit_config]
    output = Path(output_dir)
    # Build each variant's model and data once in-process, so a bad option fails now, not after hours of training.
    for variant in variants:
        args = fit_command(configs, variant, seeds[0], output / "preflight", fit_args)[1:]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            resolutions = json.dumps(list(eval_resolutions))
            cli_main([*args, "--model.eval_resolutions", resolutions, "--trainer.logger=false"], run=False)
    print(f"[study] configuration checked for variants {list(variants)}", flush=True)
    runs: list[dict[str, Any]] = []
    for variant in variants:
        for seed in seeds:
            run_dir = output / "runs" / f"{variant}-seed{seed}"
            fit = fit_command(configs, variant, seed, run_dir, fit_args)
            modes = modes_for(variant, resolution_modes)
            if dry_run:
                for args in [fit] + [test_command(run_dir, eval_resolutions, mode) for mode in modes]:
                    print(f"python {TRAIN_SCRIPT.name} {shlex.join(args)}")
                continue
            runs += _train_and_test(variant, seed, run_dir, fit, modes, eval_resolutions)
    if dry_run:
        return None
    train_resolutions = {run["train_resolution"] for run in runs}
    settings = {
        "fit_config": configs,
        "fit_args": list(fit_args),
        "variants": list(variants),
        "seeds": list(seeds),
        "resolution_modes": list(resolution_modes) if resolution_modes else None,
        "eval_resolutions": list(eval_resolutions),
        "train_resolution": train_resolutions.pop() if len(train_resolutions) == 1 else sorted(train_resolutions),
    }
    files = write_study_report(output, runs, settings)
    print(files["results.md"].read_text())
    print(f"[study] report: {', '.join(os.fspath(p) for p in files.values())}")
    return files


def _train_and_test(
    variant: str, seed: int, run_dir: Path, fit: list[str], modes: list[Optional[str]], eval_resolutions: Sequence[int]
) -> list[dict[str, Any]]:
    """One run: fit (resuming from last.ckpt if a previous attempt stopped), then one test per mode.

    Finished steps are reused. Returns one record per mode; ``fit_seconds`` is the wall time of the
    fit command that finished the run (after a resume, of that part).
    """
    fit_record = run_dir / "fit.json"
    if fit_record.exists():
        previous = json.loads(fit_record.read_text())["args"]
        if previous != fit:
            raise ValueError(
                f"{os.fspath(run_dir)} was trained by `train.py {shlex.join(previous)}`, "
                f"not `train.py {shlex.join(fit)}`; choose another output_dir or delete that folder"
            )
    else:
        resume = ["--ckpt_path", "last"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []
        seconds = _run(fit + resume, f"fit {variant} seed {seed}")
        record = {"seconds": seconds, "args": fit, "resumed": bool(resume)}
        atomic_write(fit_record, json.dumps(record, indent=2) + "\n")
    records = []
    for mode in modes:
        eval_path = run_dir / ("test" if mode is None else f"test-{mode}") / "eval.json"
        if not _tested(eval_path, run_dir / "checkpoints" / "last.ckpt", mode, eval_resolutions):
            what = f"test {variant} seed {seed}" + (f" {mode}" if mode else "")
            _run(test_command(run_dir, eval_resolutions, mode), what)
        report = json.loads(eval_path.read_text())
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "resolution_mode": mode,
                "run_dir": os.fspath(run_dir),
                "fit_seconds": json.loads(fit_record.read_text())["seconds"],
                "num_params": report["meta"]["num_params"],
                "train_resolution": report["meta"]["train_resolution"],
                "results": report["results"],
            }
        )
    return records


def _tested(eval_path: Path, checkpoint: Path, mode: Optional[str], eval_resolutions: Sequence[int]) -> bool:
    """Whether eval_path holds the test of this checkpoint, in this mode, at exactly these resolutions."""
    if not eval_path.exists():
        return False
    report = json.loads(eval_path.read_text())
    return (
        Path(report["meta"]["checkpoint"]).resolve() == checkpoint.resolve()
        and report["meta"]["resolution_mode"] == mode
        and [r["resolution"] for r in report["results"]] == sorted(eval_resolutions)
    )


def study_main(argv: Optional[list[str]] = None) -> None:
    """``train.py study`` entry: study options, then optionally ``--`` and extra fit options for every run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    if extra:
        argv += ["--fit_args+", json.dumps(extra)]
    CLI(run_study, args=argv, as_positional=False)
