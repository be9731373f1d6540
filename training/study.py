"""The position-encoding study: train each variant x seed on one budget, test everywhere, report.

    python -m training.study --config configs/study_fashion_mnist.yaml [--seeds "[0, 1, 2]"] [-- FIT OPTIONS]

The study is its own command (`main`, a jsonargparse parser of `run_study`'s arguments) on top of train.py:
each run is the public train.py CLI in a subprocess (so DDP runs as it does for ``train.py fit``)::

    train.py fit  --config <fit_config> --model.net.init_args.pos_embed <pos_embed> [--model.net.init_args.<k> <v>]
                  --seed_everything <seed> --trainer.default_root_dir <output_dir>/runs/<variant>-seed<seed> <fit_args>
    train.py test --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
                  --model.eval_resolutions <eval_resolutions> --model.eval_protocols <eval_protocols>
                  [--model.resolution_mode <mode>]

Before any run, each variant's model and data are built once in this process with train.py's CLI
(`training.cli.cli_main` with ``run=False``), so a bad option fails in seconds, not after hours. Every run
is tested with its final weights (the EMA weights when EMA is on): checkpoint selection never sees the test
split. RoPE variants without a ``rope_recipe`` are tested once per entry of ``resolution_modes``; every test
covers each protocol x resolution. A rerun of the same command skips finished steps and resumes unfinished
fits from last.ckpt; the arguments of each fit are recorded in ``run.json`` before it starts, and a run
folder whose recorded arguments differ is refused. A fit counts as finished only when it ran to the end of
its budget (`training.checkpoint.fit_completed`), whatever its exit status. The study folder is locked while
a study runs in it. Each run's subprocess runs in a process group of its own, with its DDP ranks and data
workers: SIGINT (Ctrl-C) or SIGTERM to the study asks the running fits to save last.ckpt and stop (killed
after `STOP_GRACE_SECONDS`, or at once on a second Ctrl-C), starts no queued run, and exits with status 130;
a kill -9 of the study takes every process of its runs with it (Linux parent-death signal, passed on to the
DDP ranks). The console gets one line per event (`Progress`: run k of n, what ended, how long it took, its
top-1, the ETA); each run's output goes to ``fit.log`` and ``test[-<mode>].log`` in its folder (appended on a
rerun). The report goes to ``<output_dir>/results.json``, ``results.md`` and
``accuracy_vs_resolution.png`` (`training.report`).
"""

from __future__ import annotations

import csv
import functools
import heapq
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from jsonargparse.typing import Path_fr

import vit
from ndrope.modules import ResolutionMode
from vit import AttnLogitScale

from .checkpoint import FIT_COMPLETED, RunFolderLock, check_folder, checkpoint_dir, fit_completed
from .cli import PARENT_PID_ENV, cli_main, die_with, explain_parse_error
from .data import check_protocols
from .files import atomic_write
from .module import eval_folder
from .report import verdict_markdown, write_study_report
from .transforms import EvalProtocol

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
T = TypeVar("T")
R = TypeVar("R")
#: Options the study sets for each run itself; in ``fit_args`` they would silently break the run layout.
RESERVED_FIT_OPTIONS = (
    "--config", "--trainer.default_root_dir", "--seed_everything", "--ckpt_path", "--model.eval_resolutions",
    "--model.eval_protocols", "--model.resolution_mode", "--model.net.init_args.pos_embed", "--model.net.pos_embed",
)


def check_study_args(
    variants: Sequence[str],
    seeds: Sequence[int],
    eval_resolutions: Sequence[int],
    variant_net_args: dict[str, dict[str, Any]] | None = None,
    fit_args: Sequence[str] = (),
    test_args: Sequence[str] = (),
    variant_model_args: dict[str, dict[str, Any]] | None = None,
) -> None:
    """ValueError naming the argument when a list is empty or repeats an entry, a variant is neither a
    pos_embed nor defined in ``variant_net_args``, ``variant_model_args`` names a variant that is not studied,
    or ``fit_args`` / ``test_args`` set an option the study owns."""
    for name, values in (("variants", variants), ("seeds", seeds), ("eval_resolutions", eval_resolutions)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name}={list(values)} must be a non-empty list without repeats")
    variant_net_args = variant_net_args or {}
    unknown = [v for v in variants if v not in vit.POS_EMBED_CHOICES and v not in variant_net_args]
    if unknown:
        raise ValueError(
            f"variants={list(variants)}: unknown pos_embed {unknown}; choose from {list(vit.POS_EMBED_CHOICES)} "
            "or define the variant in variant_net_args"
        )
    for name, args in variant_net_args.items():
        if not isinstance(args, dict) or args.get("pos_embed") not in vit.POS_EMBED_CHOICES:
            raise ValueError(
                f"variant_net_args[{name!r}]={args!r} must be a dict of net arguments with a pos_embed from "
                f"{list(vit.POS_EMBED_CHOICES)}"
            )
    for name, args in (variant_model_args or {}).items():
        if (name not in variants and name not in variant_net_args) or not isinstance(args, dict):
            raise ValueError(
                f"variant_model_args[{name!r}]={args!r} must be a dict of ImageClassifier arguments for a variant "
                f"that is studied or defined in variant_net_args ({sorted({*variants, *variant_net_args})})"
            )
    for name, arg in [("fit_args", a) for a in fit_args] + [("test_args", a) for a in test_args]:
        option = str(arg).split("=", 1)[0]
        if option in RESERVED_FIT_OPTIONS:
            raise ValueError(
                f"{name} sets {option}, which the study sets for every run itself "
                f"({', '.join(RESERVED_FIT_OPTIONS)}); use output_dir, seeds, variants, fit_config or "
                "eval_resolutions / eval_protocols / resolution_modes instead"
            )


def net_args(variant: str, variant_net_args: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The net arguments a variant sets: ``variant_net_args[variant]``, or ``{"pos_embed": variant}``."""
    return dict((variant_net_args or {}).get(variant) or {"pos_embed": variant})


def fit_command(
    fit_config: Sequence[str],
    variant: str,
    seed: int,
    run_dir: Path,
    fit_args: Sequence[str],
    variant_net_args: dict[str, dict[str, Any]] | None = None,
    variant_model_args: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The ``train.py fit`` arguments of one run (without the interpreter and script)."""
    configs = [arg for path in fit_config for arg in ("--config", path)]
    net = [
        f"--model.net.init_args.{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in net_args(variant, variant_net_args).items()
    ]
    model = [
        f"--model.{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in ((variant_model_args or {}).get(variant) or {}).items()
    ]
    return [
        "fit", *configs, *net, *model,
        "--seed_everything", str(seed), "--trainer.default_root_dir", os.fspath(run_dir), *fit_args,
    ]


def test_command(
    run_dir: Path,
    eval_resolutions: Sequence[int],
    eval_protocols: Sequence[str],
    mode: str | None,
    scale: str | None = None,
) -> list[str]:
    """The ``train.py test`` arguments that evaluate a finished run's last.ckpt at every protocol x resolution,
    in a resolution mode and with an attention logit scale when given.

    Results land in ``<run_dir>/<training.module.eval_folder(...)>/``: ``test``, ``test-<mode>``, ...
    """
    args = [
        "test", "--config", os.fspath(run_dir / "config.yaml"),
        "--ckpt_path", os.fspath(run_dir / "checkpoints" / "last.ckpt"),
        "--model.eval_resolutions", json.dumps(list(eval_resolutions)),
        "--model.eval_protocols", json.dumps(list(eval_protocols)),
    ]
    return args + (["--model.resolution_mode", mode] if mode else []) + (["--model.attn_logit_scale", scale] if scale else [])


#: One test of a run: (resolution mode, attention logit scale), None for the model's default.
TestRow = tuple[str | None, str | None]


def rows_for(net: dict[str, Any], resolution_modes: Sequence[str] | None, scales: Sequence[str] | None) -> list[TestRow]:
    """The tests of a variant: each resolution mode that applies (`modes_for`) x, for RoPE variants, each
    attention logit scale of ``scales`` (the attention-entropy remedy of the study)."""
    rope_scales = list(scales) if scales and "rope" in net["pos_embed"] else [None]
    return [(mode, scale) for mode in modes_for(net, resolution_modes) for scale in rope_scales]


def modes_for(net: dict[str, Any], resolution_modes: Sequence[str] | None) -> list[str | None]:
    """The resolution modes a variant (its net arguments) is tested with: only RoPE has a choice of coordinates
    at other grids, and a ``rope_recipe`` fixes its own coordinate law, so it is tested once."""
    applicable = vit.applicable_resolution_modes(net["pos_embed"], net.get("rope_recipe"))
    return [mode for mode in resolution_modes or () if mode in applicable] or [None]


#: Seconds a run gets to save last.ckpt and exit after the study asks it to stop, before it is killed.
STOP_GRACE_SECONDS = 60


class RunProcesses:
    """The train.py subprocesses a study is running, each in a process group of its own (with its DDP ranks and
    data workers): `stop_all` stops them together, after which `start` starts no more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
        """Start ``command`` (``popen``: more `subprocess.Popen` arguments, e.g. ``stdout``); it dies with this
        process (Linux parent-death signal, passed on to DDP ranks)."""
        with self._lock:
            if self.stopping:
                raise RuntimeError("[study] stopping: no new run is started")
            child = subprocess.Popen(command, env={**env, PARENT_PID_ENV: str(os.getpid())}, start_new_session=True,
                                     preexec_fn=functools.partial(die_with, os.getpid()), **popen)
            self._running.add(child)
        return child

    def finish(self, child: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
        """Make sure ``child`` and its process group are gone: SIGTERM if it still runs (a fit saves last.ckpt and
        exits), then SIGKILL for whatever is left after ``grace`` seconds (or a second interrupt)."""
        try:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # leftovers: DDP ranks, data workers, or the child itself
            except ProcessLookupError:
                pass
            child.wait()
            with self._lock:
                self._running.discard(child)

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """Start no more runs and stop the running ones together, as `finish`; returns how many were running."""
        with self._lock:
            self.stopping = True
            children = list(self._running)
        deadline = time.monotonic() + grace
        try:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                self.finish(child, max(0.0, deadline - time.monotonic()))
        finally:
            for child in children:
                self.finish(child, 0.0)
        return len(children)


_processes = RunProcesses()
#: Lines of a failed run's log shown on the study's console.
FAILED_LOG_LINES = 20


def _run(args: list[str], what: str, log: Path, threads: int | None = None) -> float:
    """Run ``train.py args`` in a subprocess, its output (stdout and stderr) appended to ``log`` after a line with
    the command; returns its wall time in seconds. A failure raises RuntimeError with the log's last lines.

    ``threads``: the subprocess's CPU threads (``OMP_NUM_THREADS``) unless the environment sets them.
    The subprocess and its process group die with this process (`RunProcesses`); when this call is interrupted,
    the subprocess is asked to stop (a fit saves last.ckpt) and killed after `STOP_GRACE_SECONDS`.
    """
    command = [sys.executable, os.fspath(TRAIN_SCRIPT), *args]
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"[study] {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {shlex.join(command)}\n")
        out.flush()
        child = _processes.start(command, env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = child.wait()
        finally:
            _processes.finish(child)
    if code:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-FAILED_LOG_LINES:])
        raise RuntimeError(f"[study] {what} failed (exit code {code}); the end of {os.fspath(log)}:\n{tail}"
                           "[study] run the study command again to resume")
    return time.perf_counter() - start


def format_seconds(seconds: float) -> str:
    """``"45s"``, ``"2m31s"`` or ``"1h02m"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def finish_time(in_flight: Sequence[float], queued: Sequence[float], jobs: int) -> float:
    """Seconds until the last run ends: the running runs (their seconds left) hold slots, and each queued run (its
    seconds, in order) starts in the first slot to free up, ``jobs`` slots in all (as `_in_parallel` runs them)."""
    slots = sorted(in_flight) + [0.0] * max(0, jobs - len(in_flight))
    heapq.heapify(slots)
    for seconds in queued:
        heapq.heappush(slots, heapq.heappop(slots) + seconds)
    return max(slots, default=0.0)


class Progress:
    """The study's console: one line per event, e.g.
    ``[study] run 5/12 rope_axial seed 1: fit done in 2m31s, val top-1 74.2; ETA 14 min``.

    The ETA comes from the fits and tests this command ran from scratch (a resumed fit or a reused step says
    nothing about the time of a full one): each unfinished run needs the mean fit (if its fit is not done) and
    the mean test for each test left, less the time its current step has run, and runs go ``jobs`` at a time
    (`finish_time`). Before the first fit has finished there is no ETA; before the first test has, the ETA
    leaves the tests out and says so.
    """

    def __init__(self, runs: Sequence[tuple[str, int, int]], jobs: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``runs``: (variant, seed, number of tests) per run, in the order they are queued."""
        self._clock = clock
        self._lock = threading.Lock()
        self.runs = list(runs)
        self.jobs = jobs
        self._fit_left = [True] * len(runs)
        self._tests_left = [tests for _, _, tests in runs]
        self._step_started: dict[int, float] = {}  # run index -> when its current step started (running runs)
        self.fit_seconds: list[float] = []
        self.test_seconds: list[float] = []

    def _name(self, index: int) -> str:
        variant, seed, _ = self.runs[index]
        return f"run {index + 1}/{len(self.runs)} {variant} seed {seed}"

    def say(self, index: int, text: str) -> None:
        print(f"[study] {self._name(index)}: {text}", flush=True)

    def start(self, index: int, text: str = "") -> None:
        """A step (fit or test) of run ``index`` starts; ``text`` (if any) goes to the console."""
        with self._lock:
            self._step_started[index] = self._clock()
        if text:
            self.say(index, text)

    def done(self, index: int, step: str, seconds: float | None, text: str) -> None:
        """A step ended: ``seconds`` it took from scratch (None: resumed or reused, not used for the ETA)."""
        with self._lock:
            if step == "fit":
                self._fit_left[index] = False
                if seconds is not None:
                    self.fit_seconds.append(seconds)
            else:
                self._tests_left[index] -= 1
                if seconds is not None:
                    self.test_seconds.append(seconds)
            self._step_started.pop(index, None)
            eta = self.eta_text()
        self.say(index, f"{text}; {eta}" if eta else text)

    def eta_text(self) -> str:
        """``"ETA 14 min"``, ``"ETA under 1 min"``, ``"ETA after the first fit"``, ``"ETA over 9 min (tests not timed
        yet)"``, ``"ETA after the first test"``, or ``"all runs done"``. Call with the lock held."""
        open_runs = [i for i in range(len(self.runs)) if self._fit_left[i] or self._tests_left[i] > 0]
        if not open_runs:
            return "all runs done"
        if any(self._fit_left[i] for i in open_runs) and not self.fit_seconds:
            return "ETA after the first fit"
        fit = sum(self.fit_seconds) / len(self.fit_seconds) if self.fit_seconds else 0.0
        test = sum(self.test_seconds) / len(self.test_seconds) if self.test_seconds else 0.0
        now = self._clock()
        in_flight, queued = [], []
        for i in open_runs:
            left = fit * self._fit_left[i] + test * self._tests_left[i]
            if i in self._step_started:
                in_flight.append(max(0.0, left - (now - self._step_started[i])))
            else:
                queued.append(left)
        minutes = math.ceil(finish_time(in_flight, queued, self.jobs) / 60)
        if not self.test_seconds and any(self._tests_left[i] > 0 for i in open_runs):
            return f"ETA over {minutes} min (tests not timed yet)" if minutes else "ETA after the first test"
        return f"ETA {minutes} min" if minutes else "ETA under 1 min"


def last_val_top1(run_dir: Path) -> float | None:
    """The last ``val/top1`` in the run's newest CSV log (``csv/version_N/metrics.csv``), None if it has none."""
    versions = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not versions:
        return None
    with open(versions[-1], newline="") as f:
        values = [row["val/top1"] for row in csv.DictReader(f) if row.get("val/top1")]
    return float(values[-1]) if values else None


def test_summary(results: Sequence[dict[str, Any]]) -> str:
    """``"top-1 (%) zoom 20/28/36px 55.1/74.0/70.2, canvas 30.2/74.0/73.5"``: an eval.json's results, by protocol."""
    protocols: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        protocols.setdefault(result.get("protocol", "zoom"), []).append(result)
    parts = []
    for i, (protocol, rows) in enumerate(protocols.items()):
        resolutions = "/".join(str(r["resolution"]) for r in rows) + "px " if i == 0 else ""
        accuracies = "/".join(f"{100 * r['top1']:.1f}" for r in rows)
        parts.append(f"{protocol} {resolutions}{accuracies}")
    return "top-1 (%) " + ", ".join(parts)


def _in_parallel(fn: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """``[fn(item) for item in items]``, ``jobs`` at a time in threads (so that the main thread only waits and
    takes interrupts); the first error is raised once every item has run. On an interrupt the queued items are
    cancelled at once."""
    pool = ThreadPoolExecutor(jobs)
    try:
        futures = [pool.submit(fn, item) for item in items]
        wait(futures)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


@contextmanager
def _stop_runs_on_interrupt() -> Iterator[None]:
    """While the study runs, SIGTERM is handled as SIGINT (KeyboardInterrupt); on either, the running runs are
    stopped together (fits save last.ckpt) and no queued run starts."""
    _processes.stopping = False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        yield
    except KeyboardInterrupt:
        print(f"[study] interrupted: stopping the running runs (each saves last.ckpt; killed after "
              f"{STOP_GRACE_SECONDS} s, or now on a second Ctrl-C); no queued run starts", file=sys.stderr, flush=True)
        stopped = _processes.stop_all()
        print(f"[study] stopped {stopped} running process(es); run the same command again to resume",
              file=sys.stderr, flush=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def run_study(
    fit_config: list[Path_fr],
    variants: list[str],
    eval_resolutions: list[int],
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse reads list defaults; never mutated)
    resolution_modes: list[ResolutionMode] | None = None,
    eval_protocols: list[EvalProtocol] = ["zoom", "canvas"],  # noqa: B006
    variant_net_args: dict[str, dict[str, Any]] | None = None,
    variant_model_args: dict[str, dict[str, Any]] | None = None,
    attn_logit_scales: list[AttnLogitScale] | None = None,
    baseline: str | None = "learned",
    output_dir: str = "reports/study",
    jobs: int = 1,
    test_args: list[str] = [],  # noqa: B006
    fit_args: list[str] = [],  # noqa: B006
    dry_run: bool = False,
) -> dict[str, Path] | None:
    """Train and test every variant x seed, then write the study report; returns the report files.

    Args:
        fit_config: ``train.py fit`` config file(s) shared by all runs, composed in order (paths in a
            study YAML are relative to it).
        variants: the rows of the study: ``pos_embed`` names (`vit.POS_EMBED_CHOICES`) or names defined
            in ``variant_net_args``.
        eval_resolutions: test resolutions (multiples of the patch size).
        seeds: one run per variant and seed; the report gives mean ± sample std over seeds.
        resolution_modes: test RoPE variants once per `NDRopeVisionTransformer.set_resolution_mode` mode (rows
            "rope_axial (interpolate)", ...), only where the mode applies (`modes_for`: not with a
            ``rope_recipe``); None tests once with the model's default.
        eval_protocols: how test images reach each resolution ("zoom": resized; "canvas": unscaled on a
            blank canvas), see `training.transforms.EvalProtocol`.
        variant_net_args: variants that are more than a pos_embed: name -> net arguments (``pos_embed``
            and e.g. ``rope_jitter``), passed as ``--model.net.init_args.<key>``.
        variant_model_args: training options of a variant: name -> `ImageClassifier` arguments, e.g.
            ``{"train_resolutions": [20, 24, 28, 32, 36]}`` (multi-resolution training), passed as ``--model.<key>``.
        attn_logit_scales: test RoPE variants once per attention logit scale as well (``[none, log-length]``:
            the attention-entropy remedy at other resolutions; rows "rope_axial (interpolate, log-length)").
        baseline: the row every other row is compared with, seed by seed (paired differences); None or a
            variant that is not studied skips the comparison.
        output_dir: report folder; runs go to ``<output_dir>/runs/<variant>-seed<seed>``.
        jobs: runs trained and tested at the same time, each with ``cpu_count // jobs`` threads (on a
            small CPU machine 2 single-thread runs beat one 2-thread run); 1 on GPUs.
        test_args: extra ``train.py test`` options for every test, e.g. ``["--trainer.limit_test_batches=0.3"]``
            (the first 30% of the test split).
        fit_args: extra ``train.py fit`` options for every run, e.g. ``["--trainer.max_epochs=2"]``;
            on the command line, the options after ``--``.
        dry_run: check every run's configuration and print the commands, without training.
    """
    started = time.perf_counter()
    fit_args = [str(a) for a in fit_args]
    test_args = [str(a) for a in test_args]
    check_study_args(variants, seeds, eval_resolutions, variant_net_args, fit_args, test_args, variant_model_args)
    if attn_logit_scales is not None and len(set(attn_logit_scales)) != len(attn_logit_scales):
        raise ValueError(f"attn_logit_scales={list(attn_logit_scales)} must not repeat a scale")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be a positive int (runs at the same time)")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if resolution_modes is not None and len(set(resolution_modes)) != len(resolution_modes):
        raise ValueError(f"resolution_modes={list(resolution_modes)} must not repeat a mode")
    eval_protocols = check_protocols(eval_protocols)
    configs = [os.fspath(path) for path in fit_config]
    output = check_folder(output_dir, "output_dir")
    lock = RunFolderLock(output, "study folder", "output_dir") if not dry_run else None
    try:
        _preflight(configs, variants, seeds, eval_resolutions, eval_protocols, variant_net_args, variant_model_args,
                   fit_args, output)
        planned = []
        for variant in variants:
            rows = rows_for(net_args(variant, variant_net_args), resolution_modes, attn_logit_scales)
            for seed in seeds:
                run_dir = output / "runs" / f"{variant}-seed{seed}"
                fit = fit_command(configs, variant, seed, run_dir, fit_args, variant_net_args, variant_model_args)
                planned.append((variant, seed, run_dir, fit, rows))
                if dry_run:
                    tests = [test_command(run_dir, eval_resolutions, eval_protocols, *row) + test_args for row in rows]
                    for args in [fit, *tests]:
                        print(f"python {TRAIN_SCRIPT.name} {shlex.join(args)}")
        if dry_run:
            return None

        progress = Progress([(variant, seed, len(rows)) for variant, seed, _, _, rows in planned], jobs)
        tests = sum(len(rows) for *_, rows in planned)
        print(f"[study] {len(planned)} runs ({len(variants)} variants x {len(seeds)} seeds) and {tests} tests, "
              f"{jobs} at a time; each run's output goes to fit.log and test*.log in its folder, "
              f"{os.fspath(output / 'runs')}/<variant>-seed<seed>/", flush=True)

        def one(indexed_plan: tuple[int, tuple]) -> tuple[list[dict[str, Any]], float]:
            index, (variant, seed, run_dir, fit, rows) = indexed_plan
            return _train_and_test(variant, seed, run_dir, fit, rows, eval_resolutions, eval_protocols, test_args,
                                   threads, progress, index)

        with _stop_runs_on_interrupt():
            outcomes = _in_parallel(one, list(enumerate(planned)), jobs)
        runs = [record for records, _ in outcomes for record in records]
        run_seconds = sum(seconds for _, seconds in outcomes)
        train_resolutions = {run["train_resolution"] for run in runs}
        settings = {
            "fit_config": configs,
            "fit_args": list(fit_args),
            "variants": list(variants),
            "variant_net_args": {v: net_args(v, variant_net_args) for v in variants if v in (variant_net_args or {})},
            "variant_model_args": dict(variant_model_args or {}),
            "attn_logit_scales": list(attn_logit_scales) if attn_logit_scales else None,
            "seeds": list(seeds),
            "resolution_modes": list(resolution_modes) if resolution_modes else None,
            "eval_resolutions": list(eval_resolutions),
            "eval_protocols": list(eval_protocols),
            "test_args": list(test_args),
            "jobs": jobs,
            "baseline": baseline if baseline in variants else None,
            "train_resolution": train_resolutions.pop() if len(train_resolutions) == 1 else sorted(train_resolutions),
            "wall_seconds": time.perf_counter() - started,
            "run_seconds": run_seconds,
        }
        files = write_study_report(output, runs, settings)
    finally:
        if lock is not None:
            lock.release()
    published = json.loads(files["results.json"].read_text())
    print("\n" + verdict_markdown(published["paired_differences"], published["settings"]["train_resolution"]))
    print(f"[study] report: {', '.join(os.fspath(p) for p in files.values())}", flush=True)
    return files


def _preflight(configs: list[str], variants: Sequence[str], seeds: Sequence[int], eval_resolutions: Sequence[int],
               eval_protocols: Sequence[str], variant_net_args: dict[str, dict[str, Any]] | None,
               variant_model_args: dict[str, dict[str, Any]] | None, fit_args: Sequence[str], output: Path) -> None:
    """Build each variant's model and data once in-process, so a bad option fails now, not after hours."""
    lightning = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in lightning]
    try:
        for logger in lightning:  # Lightning's info lines (seed, devices) for each variant: not news here
            logger.setLevel(logging.WARNING)
        for variant in variants:
            args = fit_command(configs, variant, seeds[0], output / "preflight", fit_args, variant_net_args,
                               variant_model_args)[1:]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                cli_main(
                    [*args, "--model.eval_resolutions", json.dumps(list(eval_resolutions)),
                     "--model.eval_protocols", json.dumps(list(eval_protocols)), "--trainer.logger=false"],
                    run=False,
                )
    finally:
        for logger, level in zip(lightning, levels):
            logger.setLevel(level)
    print(f"[study] configuration checked for variants {list(variants)}", flush=True)


def _train_and_test(
    variant: str,
    seed: int,
    run_dir: Path,
    fit: list[str],
    rows: list[TestRow],
    eval_resolutions: Sequence[int],
    eval_protocols: Sequence[str],
    test_args: Sequence[str] = (),
    threads: int | None = None,
    progress: Progress | None = None,
    index: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    """One run: fit (resuming from last.ckpt if a previous attempt stopped), then one test per row (mode, scale);
    each step's output goes to ``<run_dir>/fit.log`` / ``test[-<mode>[-<scale>]].log``, and its start and end to
    ``progress``.

    Finished steps are reused. Returns one record per row and the seconds spent here; ``fit_seconds`` is
    the wall time of the fit command that finished the run (after a resume, of that part).
    """
    progress = progress or Progress([(variant, seed, len(rows))], 1)
    spent = 0.0
    started = run_dir / "run.json"
    if started.exists():
        previous = json.loads(started.read_text())["args"]
        if previous != fit:
            raise ValueError(
                f"{os.fspath(run_dir)} was trained by `train.py {shlex.join(previous)}`, "
                f"not `train.py {shlex.join(fit)}`; choose another output_dir or delete that folder"
            )
    elif (run_dir / "checkpoints").exists():
        raise ValueError(
            f"{os.fspath(run_dir)} holds checkpoints but no run.json recording their arguments; "
            "choose another output_dir or delete that folder"
        )
    else:
        atomic_write(started, json.dumps({"args": fit}, indent=2) + "\n")
    fit_record = run_dir / "fit.json"
    if not fit_completed(run_dir):
        last = Path(checkpoint_dir(run_dir)) / "last.ckpt"
        resume = ["--ckpt_path", "last"] if last.exists() else []
        fit_record.unlink(missing_ok=True)
        log = run_dir / "fit.log"
        progress.start(index, f"fit {'resumed from last.ckpt' if resume else 'started'}, log {os.fspath(log)}")
        seconds = _run(fit + resume, f"fit {variant} seed {seed}", log, threads=threads)
        spent += seconds
        if not fit_completed(run_dir):
            raise RuntimeError(
                f"[study] fit {variant} seed {seed} exited without finishing its budget (no {FIT_COMPLETED} for "
                f"its last.ckpt in {checkpoint_dir(run_dir)}); see {os.fspath(log)}; run the study command again "
                "to resume"
            )
        atomic_write(fit_record, json.dumps({"seconds": seconds, "args": fit, "resumed": bool(resume)}, indent=2) + "\n")
        val = last_val_top1(run_dir)
        progress.done(index, "fit", None if resume else seconds,
                      f"fit {'(resumed) ' if resume else ''}done in {format_seconds(seconds)}"
                      + (f", val top-1 {100 * val:.1f}" if val is not None else ""))
    else:
        if not fit_record.exists():  # the study stopped between the end of the fit and this record
            seconds = json.loads((Path(checkpoint_dir(run_dir)) / FIT_COMPLETED).read_text())["seconds"]
            atomic_write(fit_record, json.dumps({"seconds": seconds, "args": fit, "resumed": True}, indent=2) + "\n")
        progress.done(index, "fit", None, "fit finished earlier, reused")
    records = []
    for mode, scale in rows:
        name = eval_folder("test", mode, scale)
        eval_path = run_dir / name / "eval.json"
        command = [*test_command(run_dir, eval_resolutions, eval_protocols, mode, scale), *test_args]
        record = eval_path.parent / "study_test.json"  # the exact test command, so other test_args retest
        same_command = record.exists() and json.loads(record.read_text())["args"] == command
        what = " ".join([f"test {variant} seed {seed}", *(option for option in (mode, scale) if option)])
        if not (same_command and _tested(eval_path, run_dir / "checkpoints" / "last.ckpt", (mode, scale),
                                         eval_resolutions, eval_protocols)):
            record.unlink(missing_ok=True)
            progress.start(index)
            seconds = _run(command, what, run_dir / f"{name}.log", threads=threads)
            spent += seconds
            atomic_write(record, json.dumps({"args": command}, indent=2) + "\n")
        else:
            seconds = None
        report = json.loads(eval_path.read_text())
        progress.done(index, "test", seconds,
                      f"{name} " + (f"done in {format_seconds(seconds)}" if seconds is not None else "reused")
                      + f", {test_summary(report['results'])}")
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "resolution_mode": mode,
                "attn_logit_scale": scale,
                "run_dir": os.fspath(run_dir),
                "fit_seconds": json.loads(fit_record.read_text())["seconds"],
                "num_params": report["meta"]["num_params"],
                "test_samples": report["meta"].get("test_samples"),
                "train_resolution": report["meta"]["train_resolution"],
                "results": report["results"],
            }
        )
    return records, spent


def _tested(eval_path: Path, checkpoint: Path, row: TestRow, eval_resolutions: Sequence[int],
            eval_protocols: Sequence[str]) -> bool:
    """Whether eval_path holds the test of this checkpoint, in this row's mode and scale, at exactly these
    protocols x resolutions."""
    mode, scale = row
    if not eval_path.exists():
        return False
    report = json.loads(eval_path.read_text())
    expected = [[p, r] for p in eval_protocols for r in eval_resolutions]
    return (
        Path(report["meta"]["checkpoint"]).resolve() == checkpoint.resolve()
        and report["meta"]["resolution_mode"] == mode
        and report["meta"].get("attn_logit_scale") == scale
        and [[r.get("protocol", "zoom"), r["resolution"]] for r in report["results"]] == expected
    )


def main(args: Sequence[str] | None = None) -> dict[str, Path] | None:
    """``python -m training.study --config configs/study_<name>.yaml [--<argument> <value> ...] [-- FIT OPTIONS]``:
    `run_study` with its arguments from study YAML files (composed in order) and the command line; the options
    after ``--`` are ``fit_args``. Returns the report files (None for a dry run); exits with status 130 when
    interrupted (SIGINT or SIGTERM)."""
    parser = ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a study YAML file, e.g. configs/study_*.yaml")
    parser.add_function_arguments(run_study, skip={"fit_args"}, as_group=False)
    parser.add_argument("fit_args", nargs="*", default=[], help="train.py fit options for every run, after `--`")
    try:
        config = parser.parse_args(args).as_dict()
    except ArgumentError as error:
        given = list(sys.argv[1:] if args is None else args)
        print(f"{parser.prog}: error: {explain_parse_error(str(error), given, parser)}\n(`{parser.prog} --help` lists "
              "every option)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    config.pop("config", None)
    try:
        return run_study(**config)
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
