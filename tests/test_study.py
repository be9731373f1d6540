"""training.study: the study command (`python -m training.study`) end to end and its failure modes (the report's
own tests are in tests/test_report.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from interruptions import CrashAtStep
from test_data import CONFIGS, accept_fake_cifar, smoke_args

import training.study
from training.checkpoint import fit_completed
from training.cli import cli_main
from training.study import Progress, finish_time, format_seconds, modes_for, run_study

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).resolve().parents[1]
FASHION = CONFIGS / "fashion_mnist.yaml"


def budget(data: Path) -> list[str]:
    """The tiny identical budget of every run: 1 epoch of 2 batches of 16 Fashion-MNIST images."""
    return [*smoke_args(FASHION, data), "--data.batch_size=16", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


class InProcessRunner:
    """Stands in for the subprocess: runs the same train.py arguments through cli_main, records them."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args: list[str], what: str, log: Path, threads: int | None = None) -> float:
        self.calls.append(args)
        if self.fail_on and self.fail_on in what:
            raise RuntimeError(f"[study] {what} failed (exit code 1)")
        start = time.perf_counter()
        cli_main(args)
        return time.perf_counter() - start


def table_cells(markdown: str, title: str) -> dict[tuple[str, int], tuple[float, float]]:
    """{(row, resolution): (mean, std)} parsed from the markdown table under the heading ``title``."""
    section = markdown.split(title)[1].split("#")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    resolutions = [int(re.match(r"\s*(\d+)", cell).group(1)) for cell in lines[0].strip("|").split("|")[1:]]
    cells = {}
    for line in lines[2:]:
        variant, *values = [c.strip() for c in line.strip("|").split("|")]
        for resolution, value in zip(resolutions, values):
            mean, _, std = value.split(" [")[0].partition(" ± ")
            cells[variant, resolution] = (float(mean), float(std or 0.0))  # one seed: the value alone
    return cells


def test_study_end_to_end(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 variants x 1 seed: report files exist, the tables equal results.json, which equals each run's eval.json.

    RoPE is tested in two resolution modes, which agree at the training resolution. The first attempt
    dies in the second run's fit; the rerun trains only that run.
    """
    failing = InProcessRunner(fail_on="fit rope_axial")
    monkeypatch.setattr(training.study, "_run", failing)
    kwargs = dict(fit_config=[str(FASHION)], variants=["learned", "rope_axial"], eval_resolutions=[20, 28, 36],
                  seeds=[0], resolution_modes=["extrapolate", "interpolate"], output_dir=str(tmp_path),
                  fit_args=budget(data))
    with pytest.raises(RuntimeError, match="fit rope_axial seed 0 failed"):
        run_study(**kwargs)
    assert not (tmp_path / "results.json").exists()
    assert [args[0] for args in failing.calls] == ["fit", "test", "fit"]

    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    files = run_study(**kwargs)
    assert [args[0] for args in runner.calls] == ["fit", "test", "test"]  # learned was finished: not redone
    assert "--model.net.init_args.pos_embed=rope_axial" in runner.calls[0]
    assert [args[-1] for args in runner.calls[1:]] == ["extrapolate", "interpolate"]
    assert sorted(files) == ["accuracy_vs_resolution.png", "results.json", "results.md"]
    assert files["accuracy_vs_resolution.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads(files["results.json"].read_text())
    assert results["settings"]["train_resolution"] == 28
    assert results["settings"]["eval_protocols"] == ["zoom", "canvas"]
    for run in results["runs"]:
        folder = "test" if run["resolution_mode"] is None else f"test-{run['resolution_mode']}"
        eval_report = json.loads((Path(run["run_dir"]) / folder / "eval.json").read_text())
        assert run["results"] == eval_report["results"]
        assert eval_report["meta"]["resolution_mode"] == run["resolution_mode"]
    markdown = files["results.md"].read_text()
    rows = ("learned", "rope_axial (extrapolate)", "rope_axial (interpolate)")
    for protocol in ("zoom", "canvas"):
        summary = {(s["label"], s["resolution"]): s for s in results["summary"]
                   if s["metric"] == "top1" and s["protocol"] == protocol}
        assert sorted(summary) == sorted((label, r) for label in rows for r in (20, 28, 36))
        assert summary[rows[1], 28]["mean"] == summary[rows[2], 28]["mean"]  # modes only differ off the training grid
        cells = table_cells(markdown, f"### top-1 accuracy (%), {protocol}")
        assert sorted(cells) == sorted(summary)
        for key, (mean, std) in cells.items():
            assert mean == pytest.approx(100 * summary[key]["mean"], abs=0.005)
            assert std == 0.0 and summary[key]["n"] == 1
        assert " ± " not in markdown.split(f"### top-1 accuracy (%), {protocol}")[1].split("#")[0]  # one seed: no std
    assert "## Which resolution mode has the higher mean" in markdown and "Wall time of the study command that ran" in markdown

    again = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", again)
    run_study(**kwargs)
    assert again.calls == []  # everything finished: the report is written again, the same, timings included
    assert files["results.md"].read_text() == markdown
    with pytest.raises(ValueError, match=r"learned-seed0 was trained by .* choose another output_dir"):
        run_study(**{**kwargs, "fit_args": [*budget(data), "--trainer.max_epochs=2"]})


def test_seeds_mean_std_and_paired_differences_recomputed_from_run_files(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 seeds x 2 variants (one with its own net arguments): every mean ± std and paired difference in the
    report equals a recomputation from the runs' own eval.json files."""
    monkeypatch.setattr(training.study, "_run", InProcessRunner())
    files = run_study(
        fit_config=[str(FASHION)], variants=["learned", "rope_axial_aug"], eval_resolutions=[20, 28],
        seeds=[0, 1, 2], eval_protocols=["zoom", "canvas"], output_dir=str(tmp_path), fit_args=budget(data),
        variant_net_args={"rope_axial_aug": {"pos_embed": "rope_axial", "rope_jitter": 1.3, "rope_rescale": 1.4}},
    )
    config = yaml.safe_load((tmp_path / "runs" / "rope_axial_aug-seed1" / "config.yaml").read_text())
    assert config["model"]["net"]["init_args"]["rope_jitter"] == 1.3 and config["seed_everything"] == 1
    per_run: dict[tuple[str, str, int], dict[int, float]] = {}
    for run_dir in sorted((tmp_path / "runs").iterdir()):
        variant, seed = run_dir.name.rsplit("-seed", 1)
        for record in json.loads((run_dir / "test" / "eval.json").read_text())["results"]:
            per_run.setdefault((variant, record["protocol"], record["resolution"]), {})[int(seed)] = record["top1"]
    results = json.loads(files["results.json"].read_text())
    summary = {(s["label"], s["protocol"], s["resolution"]): s for s in results["summary"] if s["metric"] == "top1"}
    assert sorted(summary) == sorted(per_run)
    markdown = files["results.md"].read_text()
    for key, by_seed in per_run.items():
        values = [by_seed[s] for s in (0, 1, 2)]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert summary[key]["mean"] == pytest.approx(mean, abs=1e-12)
        assert summary[key]["std"] == pytest.approx(std, abs=1e-12) and summary[key]["n"] == 3
        cells = table_cells(markdown, f"### top-1 accuracy (%), {key[1]}")
        assert cells[key[0], key[2]] == pytest.approx((round(100 * mean, 2), round(100 * std, 2)), abs=0.0051)
    differences = {(d["label"], d["protocol"], d["resolution"]): d for d in results["paired_differences"]}
    assert sorted(differences) == sorted(k for k in per_run if k[0] == "rope_axial_aug")
    for (label, protocol, resolution), d in differences.items():
        expected = [per_run[label, protocol, resolution][s] - per_run["learned", protocol, resolution][s]
                    for s in (0, 1, 2)]
        assert d["differences"] == pytest.approx(expected, abs=1e-12)
        assert d["mean"] == pytest.approx(statistics.fmean(expected), abs=1e-12)
        assert d["std"] == pytest.approx(statistics.stdev(expected), abs=1e-12)
        assert d["wins"] == sum(x > 0 for x in expected)
    assert "rope_axial_aug − learned | " in markdown.split("## Paired differences")[1]


def test_interrupted_run_resumed_with_other_arguments_is_refused(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder with a checkpoint but no fit.json (interrupted) records its arguments from the start."""
    monkeypatch.setattr(training.study, "_run", InProcessRunner(fail_on="fit learned"))
    kwargs = dict(fit_config=[str(FASHION)], variants=["learned"], eval_resolutions=[28], seeds=[0],
                  output_dir=str(tmp_path), fit_args=budget(data))
    with pytest.raises(RuntimeError):
        run_study(**kwargs)
    run_dir = tmp_path / "runs" / "learned-seed0"
    assert (run_dir / "run.json").exists() and not (run_dir / "fit.json").exists()
    monkeypatch.setattr(training.study, "_run", InProcessRunner())
    with pytest.raises(ValueError, match=r"learned-seed0 was trained by .*max_epochs=3"):
        run_study(**{**kwargs, "fit_args": [*budget(data), "--trainer.max_epochs=3"]})


def test_study_folder_is_locked(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.checkpoint import RunFolderLock

    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    with RunFolderLock(tmp_path):
        with pytest.raises(RuntimeError, match=r"study folder .* is in use by another process"):
            run_study(fit_config=[str(FASHION)], variants=["learned"], eval_resolutions=[28], seeds=[0],
                      output_dir=str(tmp_path), fit_args=budget(data))
    assert runner.calls == []


CHILD_OF_KILLED_PARENT = """
import sys, time
from pathlib import Path
import training.study as study
study.TRAIN_SCRIPT = Path(sys.argv[1])
study._run(["ignored"], "sleeper", Path(sys.argv[2]))
"""


def test_killing_the_study_kills_its_run(tmp_path: Path) -> None:
    """kill -9 of the study process takes its training subprocess with it (no orphan writing into the run)."""
    sleeper = tmp_path / "sleeper.py"
    pid_file = tmp_path / "child.pid"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_KILLED_PARENT, str(sleeper), str(tmp_path / "run.log")],
                              cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


class StopsEarlyRunner(InProcessRunner):
    """Its fits stop inside their second epoch and it still reports success: what a fit stopped by SIGTERM used to do
    (Lightning's exit status 0)."""

    def __call__(self, args: list[str], what: str, log: Path, threads: int | None = None) -> float:
        if args[0] != "fit":
            return super().__call__(args, what, log, threads)
        self.calls.append(args)
        cli = cli_main(args[1:], run=False)
        cli.trainer.callbacks.append(CrashAtStep(3))
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return 1.0


def test_fit_that_did_not_finish_is_never_recorded(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit child that exits 0 before the end of its budget is not recorded, tested or reported (it used to be
    recorded as finished, tested half-trained and published, and a rerun skipped it); the rerun resumes it."""
    monkeypatch.setattr(training.study, "_run", StopsEarlyRunner())
    kwargs = dict(fit_config=[str(FASHION)], variants=["learned"], eval_resolutions=[28], seeds=[0],
                  output_dir=str(tmp_path), fit_args=[*budget(data), "--trainer.max_epochs=2"])
    with pytest.raises(RuntimeError, match=r"fit learned seed 0 exited without finishing its budget \(no "
                                           r"fit_completed.json"):
        run_study(**kwargs)
    run_dir = tmp_path / "runs" / "learned-seed0"
    assert not (run_dir / "fit.json").exists() and not (run_dir / "test").exists()
    assert not (tmp_path / "results.json").exists()

    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    run_study(**kwargs)
    assert [args[0] for args in runner.calls] == ["fit", "test"] and runner.calls[0][-2:] == ["--ckpt_path", "last"]
    assert json.loads((run_dir / "fit.json").read_text())["resumed"] is True
    assert fit_completed(run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # 2 x 2 steps
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["variant"] == "learned"


FAKE_TRAIN_SCRIPT = """
import os, signal, subprocess, sys, time
from pathlib import Path

# A stand-in for train.py: records itself, starts a helper that ignores SIGTERM (as a DDP rank may),
# and on SIGTERM records that it was asked to stop.
folder = Path(os.environ["FAKE_RUNS"])
helper = subprocess.Popen([sys.executable, "-c",
                           "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])

def stop(signum, frame):
    (folder / f"{os.getpid()}.stopped").touch()
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, stop)
(folder / f"{os.getpid()}.run").write_text(f"{helper.pid}\\n")
time.sleep(300)
"""

STUDY_WITH_FAKE_RUNS = """
import sys
from pathlib import Path
import training.study as study
study.TRAIN_SCRIPT = Path(sys.argv[1])
study.main(sys.argv[2:])
"""


def test_interrupt_stops_running_runs_and_starts_no_more(data: Path, tmp_path: Path) -> None:
    """Ctrl-C to a study running 2 of 4 runs at a time: both running runs are asked to stop (SIGTERM, so a fit
    saves last.ckpt), their process groups are killed (helpers that ignore SIGTERM too), no queued run starts, and
    the study exits with status 130 in seconds (it used to wait until every queued run had finished)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN_SCRIPT)
    command = [sys.executable, "-c", STUDY_WITH_FAKE_RUNS, str(script), f"--fit_config=[{FASHION}]",
               "--variants=[learned, rope_axial]", "--seeds=[0, 1]", "--eval_resolutions=[28]", "--jobs=2",
               f"--output_dir={tmp_path / 'study'}", "--", *budget(data)]
    study = subprocess.Popen(command, cwd=REPO, env={**os.environ, "FAKE_RUNS": str(runs)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(runs.glob("*.run"))) < 2 and study.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        started = sorted(runs.glob("*.run"))
        assert len(started) == 2, study.communicate(timeout=60)[0][-3000:]
        interrupted = time.monotonic()
        study.send_signal(signal.SIGINT)
        output = study.communicate(timeout=60)[0]
        seconds = time.monotonic() - interrupted
    finally:
        study.kill()
    assert study.returncode == 130, output[-3000:]
    assert seconds < 30, output[-3000:]
    assert "[study] interrupted: stopping the running runs" in output
    assert sorted(p.name for p in runs.glob("*.stopped")) == sorted(f"{p.stem}.stopped" for p in started)
    time.sleep(0.5)
    assert len(list(runs.glob("*.run"))) == 2  # the queued runs never started
    for pid_file in started:
        assert not _alive(int(pid_file.stem)) and not _alive(int(pid_file.read_text()))


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, seconds: float = 300) -> None:
    """Poll ``condition`` until it holds; fail with the process's output if the process ends or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"condition not reached; output:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.1)


def study_process(data: Path, tmp_path: Path, variants: list[str], *fit_args: str, jobs: int = 1) -> subprocess.Popen:
    """`python -m training.study` on the tiny budget, its fits pausing at step 3 until ``<tmp_path>/signals/go``."""
    signals = tmp_path / "signals"
    signals.mkdir(exist_ok=True)
    pause = ["--trainer.callbacks+=interruptions.PauseAtStep", "--trainer.callbacks.step=3",
             f"--trainer.callbacks.folder={signals}"]
    command = [sys.executable, "-m", "training.study", f"--fit_config=[{FASHION}]", f"--variants=[{', '.join(variants)}]",
               "--seeds=[0]", "--eval_resolutions=[28]", "--eval_protocols=[zoom]", f"--jobs={jobs}",
               f"--output_dir={tmp_path / 'study'}", "--", *budget(data), "--data.batch_size=4",
               "--trainer.limit_train_batches=10", *fit_args, *pause]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_interrupted_study_saves_its_fits_and_the_rerun_resumes_them(data: Path, tmp_path: Path) -> None:
    """The real command, 2 jobs, 3 runs: Ctrl-C while both running fits are at step 4 of 10. Both save last.ckpt at
    step 4 and stop, the third never starts, nothing is reported; the same command then resumes both from step 4."""
    variants = ["learned", "rope_axial", "rope_mixed"]
    study = study_process(data, tmp_path, variants, jobs=2)
    signals = tmp_path / "signals"
    wait_for(lambda: len(list(signals.glob("paused-*"))) == 2, study)
    study.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the study passes SIGTERM on to both fits, which finish their step once released
    (signals / "go").touch()
    output = study.communicate(timeout=300)[0]
    assert study.returncode == 130, output[-3000:]
    runs = tmp_path / "study" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["learned-seed0", "rope_axial-seed0"]  # rope_mixed: queued
    for run in runs.iterdir():
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
        assert not fit_completed(run) and not (run / "fit.json").exists()
    assert not (tmp_path / "study" / "results.json").exists()

    rerun = study_process(data, tmp_path, variants, jobs=2)
    output = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, output[-3000:]
    for variant in variants:
        run = runs / f"{variant}-seed0"
        assert fit_completed(run)
        assert json.loads((run / "fit.json").read_text())["resumed"] is (variant != "rope_mixed")
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert sorted(r["variant"] for r in results["runs"]) == sorted(variants)


def ranks_of(output_dir: Path) -> dict[int, int]:
    """{pid: LOCAL_RANK} of the live train.py processes whose command line names ``output_dir``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
        if "train.py" in cmdline and str(output_dir) in cmdline and _alive(int(proc.name)):
            rank = next((int(v.split("=", 1)[1]) for v in environ if v.startswith("LOCAL_RANK=")), 0)
            found[int(proc.name)] = rank
    return found


@pytest.mark.slow
def test_killing_a_ddp_study_kills_every_rank(data: Path, tmp_path: Path) -> None:
    """kill -9 of a study whose fit runs DDP on 2 CPU processes: both ranks die with it, at once (Lightning starts
    rank 1 without a parent-death signal: it used to stay alive, here paused, until it noticed)."""
    study = study_process(data, tmp_path, ["learned"], "--trainer.accelerator=cpu", "--trainer.devices=2",
                          "--trainer.strategy=ddp")
    signals = tmp_path / "signals"
    try:
        wait_for(lambda: len(list(signals.glob("paused-*"))) == 2, study)
        ranks = ranks_of(tmp_path / "study")
        assert sorted(ranks.values()) == [0, 1]
        study.send_signal(signal.SIGKILL)
        study.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in ranks if _alive(pid)]
    finally:
        study.kill()
        for pid in ranks_of(tmp_path / "study"):
            os.kill(pid, signal.SIGKILL)


class TestStudyRejectsBadInput:
    """Errors come before any training (the runner is never called) and name the argument."""

    @pytest.fixture(autouse=True)
    def no_runs(self, monkeypatch: pytest.MonkeyPatch) -> InProcessRunner:
        runner = InProcessRunner()
        monkeypatch.setattr(training.study, "_run", runner)
        yield runner
        assert runner.calls == []

    def run(self, data: Path, tmp_path: Path, **overrides) -> None:
        kwargs = dict(fit_config=[str(FASHION)], variants=["learned"], eval_resolutions=[28], seeds=[0],
                      output_dir=str(tmp_path), fit_args=budget(data))
        run_study(**{**kwargs, **overrides})

    @pytest.mark.parametrize("dry_run", [False, True])
    def test_output_dir_that_is_a_file(self, data: Path, tmp_path: Path, dry_run: bool) -> None:
        file = tmp_path / "report"
        file.write_text("")
        with pytest.raises(ValueError, match=rf"output_dir='{file}' is a file, not a folder"):
            self.run(data, tmp_path, output_dir=str(file), dry_run=dry_run)

    def test_unknown_variant(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"unknown pos_embed \['rope_2d'\]; choose from \['learned'.* or define"):
            self.run(data, tmp_path, variants=["learned", "rope_2d"])

    def test_variant_net_args_without_pos_embed(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"variant_net_args\['aug'\]=\{'rope_jitter': 1.2\} must be a dict .* "
                                             r"with a pos_embed"):
            self.run(data, tmp_path, variants=["aug"], variant_net_args={"aug": {"rope_jitter": 1.2}})

    def test_repeated_seed(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"seeds=\[0, 0\] must be a non-empty list without repeats"):
            self.run(data, tmp_path, seeds=[0, 0])

    def test_resolution_not_multiple_of_patch(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"\[30\] not a positive multiple of patch_size=4"):
            self.run(data, tmp_path, eval_resolutions=[28, 30])

    def test_missing_dataset(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            self.run(data, tmp_path, fit_args=[*budget(data), f"--data.root={tmp_path / 'none'}"])

    @pytest.mark.parametrize("option", ["--trainer.default_root_dir", "--seed_everything", "--ckpt_path",
                                        "--model.net.init_args.pos_embed", "--config"])
    def test_fit_args_cannot_override_what_the_study_sets(self, data: Path, tmp_path: Path, option: str) -> None:
        """`study --dry_run -- --trainer.default_root_dir X` used to point every fit at X while tests read the runs."""
        with pytest.raises(ValueError, match=rf"fit_args sets {option}, which the study sets for every run itself"):
            self.run(data, tmp_path, fit_args=[*budget(data), f"{option}={tmp_path / 'x'}"], dry_run=True)

    def test_fit_args_after_double_dash_on_the_command_line(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"fit_args sets --trainer.default_root_dir"):
            training.study.main([f"--fit_config=[{FASHION}]", "--variants=[learned]", "--eval_resolutions=[28]",
                                 "--dry_run=true", f"--output_dir={tmp_path}", "--", "--trainer.default_root_dir", "X"])


class TestProgress:
    """The study's console: one line per event, with an ETA from the measured fits and tests."""

    def test_finish_time_fills_free_slots_in_queue_order(self) -> None:
        assert finish_time([30.0, 10.0], [100.0, 100.0, 100.0], jobs=2) == 210.0  # 10+100, 30+100, 110+100
        assert finish_time([], [60.0, 60.0, 60.0], jobs=2) == 120.0
        assert finish_time([5.0], [], jobs=2) == 5.0
        assert finish_time([], [], jobs=1) == 0.0

    def test_format_seconds(self) -> None:
        assert [format_seconds(s) for s in (0.4, 45, 151, 3599.6, 3720)] == ["0s", "45s", "2m31s", "1h00m", "1h02m"]

    def test_eta_is_honest_before_anything_was_timed(self, capsys: pytest.CaptureFixture) -> None:
        now = [0.0]
        progress = Progress([("learned", 0, 1), ("rope_axial", 0, 2), ("rope_mixed", 0, 1)], jobs=2,
                            clock=lambda: now[0])
        progress.start(0, "fit started")
        progress.start(1, "fit started")
        now[0] = 100.0
        progress.done(0, "fit", 100.0, "fit done in 1m40s")  # the tests are not timed yet: the ETA leaves them out
        progress.start(0)
        now[0] = 120.0
        progress.done(0, "test", 20.0, "test done in 20s")  # run 2: 100 + 2 x 20 - 120 left; run 3: 120, queued
        progress.start(2, "fit started")
        now[0] = 130.0
        progress.done(1, "fit", 130.0, "fit done in 2m10s")  # fits take 115: run 3 has 115 + 20 - 10 left
        assert capsys.readouterr().out.splitlines() == [
            "[study] run 1/3 learned seed 0: fit started",
            "[study] run 2/3 rope_axial seed 0: fit started",
            "[study] run 1/3 learned seed 0: fit done in 1m40s; ETA over 2 min (tests not timed yet)",
            "[study] run 1/3 learned seed 0: test done in 20s; ETA 2 min",
            "[study] run 3/3 rope_mixed seed 0: fit started",
            "[study] run 2/3 rope_axial seed 0: fit done in 2m10s; ETA 3 min",
        ]

    def test_eta_under_a_minute(self, capsys: pytest.CaptureFixture) -> None:
        now = [0.0]
        progress = Progress([("learned", 0, 1), ("learned", 1, 1)], jobs=2, clock=lambda: now[0])
        progress.start(0)
        progress.start(1)
        now[0] = 20.0
        progress.done(0, "fit", 20.0, "fit done in 20s")  # left: tests of unknown length only, not "over 0 min"
        progress.start(0)
        now[0] = 30.0
        progress.done(0, "test", 10.0, "test done in 10s")  # left: run 2's test, 10 s
        assert [line.split("; ")[-1] for line in capsys.readouterr().out.splitlines()] == [
            "ETA after the first test", "ETA under 1 min"]

    def test_no_eta_before_the_first_fit_and_resumed_fits_are_not_timed(self, capsys: pytest.CaptureFixture) -> None:
        progress = Progress([("learned", 0, 1), ("learned", 1, 1)], jobs=1, clock=lambda: 0.0)
        progress.done(0, "fit", None, "fit (resumed) done in 10s")
        progress.done(0, "test", 20.0, "test done in 20s")
        progress.done(1, "fit", None, "fit finished earlier, reused")
        progress.done(1, "test", None, "test reused")
        assert [line.split("; ")[-1] for line in capsys.readouterr().out.splitlines()] == [
            "ETA after the first fit", "ETA after the first fit", "ETA 1 min", "all runs done"]


def test_run_output_goes_to_its_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """A run's stdout and stderr go to its log, after the command (nothing on the study's console); a failure
    shows the end of the log."""
    script = tmp_path / "fake_train.py"
    script.write_text("import sys\nprint('model summary')\nprint('a warning', file=sys.stderr)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    monkeypatch.setattr(training.study, "TRAIN_SCRIPT", script)
    log = tmp_path / "run" / "fit.log"
    training.study._run(["0"], "fit learned seed 0", log)
    with pytest.raises(RuntimeError, match=r"fit learned seed 0 failed \(exit code 3\); the end of .*fit.log:\n"
                                           r"(.*\n)*model summary\na warning\n\[study\] run the study command again"):
        training.study._run(["3"], "fit learned seed 0", log)
    lines = log.read_text().splitlines()
    assert [line for line in lines if not line.startswith("[study]")] == ["model summary", "a warning"] * 2
    assert lines[0].startswith("[study] ") and lines[0].endswith(f"fit learned seed 0: {sys.executable} {script} 0")
    assert capsys.readouterr().out == ""


def test_study_console_has_one_line_per_event(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """2 runs, one with 2 tests: a header, a start and an end line per fit, a line per test, the verdict, the files."""
    monkeypatch.setattr(training.study, "_run", InProcessRunner())
    run_study(fit_config=[str(FASHION)], variants=["learned", "rope_axial"], eval_resolutions=[20, 28], seeds=[0],
              resolution_modes=["extrapolate", "interpolate"], eval_protocols=["zoom"], output_dir=str(tmp_path),
              fit_args=budget(data))
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study]")]
    runs = tmp_path / "runs"
    assert console[0] == "[study] configuration checked for variants ['learned', 'rope_axial']"
    assert console[1] == (f"[study] 2 runs (2 variants x 1 seeds) and 3 tests, 1 at a time; each run's output goes to "
                          f"fit.log and test*.log in its folder, {runs}/<variant>-seed<seed>/")
    assert console[2] == f"[study] run 1/2 learned seed 0: fit started, log {runs / 'learned-seed0' / 'fit.log'}"
    assert re.fullmatch(r"\[study\] run 1/2 learned seed 0: fit done in \d+s, val top-1 \d+\.\d; ETA (over \d+ min "
                        r"\(tests not timed yet\)|after the first test)", console[3])
    assert re.fullmatch(r"\[study\] run 1/2 learned seed 0: test done in \d+s, top-1 \(%\) zoom 20/28px "
                        r"\d+\.\d/\d+\.\d; ETA (\d+ min|under 1 min)", console[4])
    assert re.fullmatch(r"\[study\] run 2/2 rope_axial seed 0: fit done in \d+s, val top-1 \d+\.\d; ETA (\d+ min|"
                        r"under 1 min)", console[6])
    assert re.fullmatch(r"\[study\] run 2/2 rope_axial seed 0: test-extrapolate done in .*; ETA (\d+ min|under 1 min)",
                        console[7])
    assert re.fullmatch(r"\[study\] run 2/2 rope_axial seed 0: test-interpolate done in .*; all runs done",
                        console[8])
    assert console[9].startswith("[study] report: ") and len(console) == 10


def test_resolution_modes_only_for_rope_without_a_recipe() -> None:
    """Only RoPE positions change with the resolution mode, and a rope_recipe fixes its own: tested once."""
    modes = ["extrapolate", "interpolate"]
    assert modes_for({"pos_embed": "rope_axial"}, modes) == modes
    assert modes_for({"pos_embed": "rope_mixed+learned", "rope_jitter": 1.2}, modes) == modes
    assert modes_for({"pos_embed": "learned"}, modes) == [None]
    assert modes_for({"pos_embed": "rope_axial", "rope_recipe": "dinov3"}, modes) == [None]
    assert modes_for({"pos_embed": "rope_axial"}, None) == [None]


def test_study_command_line(tmp_path: Path) -> None:
    """`python -m training.study --help` lists run_study's arguments; train.py's CLI never imports the study."""
    result = subprocess.run([sys.executable, "-m", "training.study", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for option in ("--config", "--fit_config", "--variants", "--seeds", "--jobs", "--dry_run", "fit_args"):
        assert option in result.stdout
    code = "import sys, training.cli; print(sorted(m for m in sys.modules if m.startswith('training.')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training.study" not in result.stdout and "training.cli" in result.stdout


STUDY_CONFIGS = sorted(p.name for p in CONFIGS.glob("study_*.yaml"))
#: Study configs that list only what differs from a base study config, and that base.
STUDY_BASES = {"study_progression.yaml": "study_fashion_mnist.yaml", "study_cifar100.yaml": "study_cifar10.yaml",
               "study_fashion_mnist_long.yaml": "study_fashion_mnist.yaml"}


def test_study_configs_exist() -> None:
    expected = {"study_fashion_mnist.yaml", "study_progression.yaml", "study_cifar10.yaml", "study_cifar100.yaml",
                "study_imagenet100.yaml"}
    assert expected <= set(STUDY_CONFIGS)


@pytest.mark.parametrize("config", STUDY_CONFIGS)
def test_every_study_config_checks_out(data: Path, tmp_path: Path, config: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """`python -m training.study --config <base> --config <study> --dry_run true -- <fake data>` builds every
    variant (its net arguments included) and prints its commands, one fit per variant x seed."""
    accept_fake_cifar(monkeypatch, data / "cifar")
    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    stack = [CONFIGS / STUDY_BASES[config]] if config in STUDY_BASES else []
    stack.append(CONFIGS / config)
    study: dict = {}
    for path in stack:
        study.update(yaml.safe_load(path.read_text()))
    fit_config = CONFIGS / study["fit_config"][0]
    training.study.main([*[a for path in stack for a in ("--config", str(path))], "--dry_run=true",
                         f"--output_dir={tmp_path}", "--", *smoke_args(fit_config, data)])
    printed = capsys.readouterr().out.replace("'", "")
    for variant in study["variants"]:
        pos_embed = (study.get("variant_net_args") or {}).get(variant, {}).get("pos_embed", variant)
        assert f"--model.net.init_args.pos_embed={pos_embed}" in printed
        assert f"runs/{variant}-seed{study['seeds'][0]}" in printed
    assert printed.count("train.py fit") == len(study["variants"]) * len(study["seeds"])
    assert runner.calls == []


def test_progression_covers_every_pos_embed() -> None:
    import vit

    progression = yaml.safe_load((CONFIGS / "study_progression.yaml").read_text())
    assert set(vit.POS_EMBED_CHOICES) <= set(progression["variants"])


@pytest.mark.slow
def test_study_command_in_subprocesses(data: Path, tmp_path: Path) -> None:
    """The real command: `python -m training.study --config ... -- <budget>` with one subprocess per fit and test."""
    study = tmp_path / "study.yaml"
    study.write_text(f"fit_config: [{FASHION}]\nvariants: [learned, rope_mixed]\nseeds: [0]\n"
                     f"eval_resolutions: [24, 28]\neval_protocols: [zoom]\noutput_dir: {tmp_path / 'report'}\n")
    result = subprocess.run([sys.executable, "-m", "training.study", "--config", str(study), "--", *budget(data)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(r["variant"], [x["resolution"] for x in r["results"]]) for r in results["runs"]] == [
        ("learned", [24, 28]), ("rope_mixed", [24, 28])]
    # the console: one line per event and the verdict; each run's output (Lightning's summaries, tables and
    # warnings) in its logs
    console = result.stdout + result.stderr
    assert "## Verdict" in result.stdout and "[study] run 2/2 rope_mixed seed 0: test done in" in result.stdout
    for noise in ("┏", "Test metric", "litlogger", "LeafSpec", "GPU available", "Seed set to", "train.py fit"):
        assert noise not in console, console
    assert len(console.splitlines()) < 25, console
    run = tmp_path / "report" / "runs" / "learned-seed0"
    assert "GPU available" in (run / "fit.log").read_text() and "zoom" in (run / "test.log").read_text()


def test_remedies_multi_resolution_training_and_the_entropy_scale(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`variant_model_args` trains a variant with its own module options (multi-resolution training), and
    `attn_logit_scales` tests RoPE variants once per scale (a learned table once): each in its own folder,
    each compared in the report with the same model without the remedy."""
    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    files = run_study(
        fit_config=[str(FASHION)], variants=["learned", "rope_axial", "rope_axial_multires"], seeds=[0, 1],
        eval_resolutions=[28, 36], eval_protocols=["zoom"], resolution_modes=["interpolate"],
        variant_net_args={"rope_axial_multires": {"pos_embed": "rope_axial"}},
        variant_model_args={"rope_axial_multires": {"train_resolutions": [20, 28, 36]}},
        attn_logit_scales=["none", "log-length"], output_dir=str(tmp_path), fit_args=budget(data),
    )
    fits = [args for args in runner.calls if args[0] == "fit"]
    assert sum("--model.train_resolutions=[20, 28, 36]" in args for args in fits) == 2  # the multires seeds only
    tests = [args for args in runner.calls if args[0] == "test"]
    assert sum("--model.attn_logit_scale" in args for args in tests) == 8  # 2 RoPE variants x 2 seeds x 2 scales
    assert len(tests) == 2 + 8  # learned: one test per seed
    run = tmp_path / "runs" / "rope_axial-seed0"
    assert {p.name for p in run.iterdir() if p.name.startswith("test")} == {"test-interpolate",
                                                                            "test-interpolate-log-length"}
    results = json.loads(files["results.json"].read_text())
    groups = {(d["label"], d["baseline"]) for d in results["paired_differences"]
              if d["group"] == "the attention-entropy scale against none"}
    assert groups == {("rope_axial (interpolate, log-length)", "rope_axial (interpolate, none)"),
                      ("rope_axial_multires (interpolate, log-length)", "rope_axial_multires (interpolate, none)")}
    extends = {(d["label"], d["baseline"]) for d in results["paired_differences"]
               if d["group"] == "against the variant it extends"}
    assert ("rope_axial_multires (interpolate, none)", "rope_axial (interpolate, none)") in extends
    scaled = json.loads((run / "test-interpolate-log-length" / "eval.json").read_text())
    plain = json.loads((run / "test-interpolate" / "eval.json").read_text())
    assert scaled["results"][0] == plain["results"][0]  # the identity at the training size
    with pytest.raises(ValueError, match=r"variant_model_args\['nope'\]"):
        run_study(fit_config=[str(FASHION)], variants=["learned"], eval_resolutions=[28],
                  variant_model_args={"nope": {}}, output_dir=str(tmp_path / "bad"), fit_args=budget(data))
