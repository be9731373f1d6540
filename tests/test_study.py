"""training.study / training.report: the position-encoding study end to end, its report, and its failure modes."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_data import CONFIGS, accept_fake_cifar, smoke_args

import training.report
import training.study
from training.cli import cli_main
from training.report import atomic_write, summarize
from training.study import run_study

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

    def __call__(self, args: list[str], what: str, threads: int | None = None) -> float:
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
    assert "## Which resolution mode wins" in markdown and "Wall time of this study command" in markdown

    again = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", again)
    run_study(**kwargs)
    assert again.calls == []  # everything finished: only the report is rewritten
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
    assert "## Paired differences: row − learned" in markdown


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
study._run(["ignored"], "sleeper")
"""


def test_killing_the_study_kills_its_run(tmp_path: Path) -> None:
    """kill -9 of the study process takes its training subprocess with it (no orphan writing into the run)."""
    sleeper = tmp_path / "sleeper.py"
    pid_file = tmp_path / "child.pid"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_KILLED_PARENT, str(sleeper)], cwd=REPO)
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
            cli_main(["study", f"--fit_config=[{FASHION}]", "--variants=[learned]", "--eval_resolutions=[28]",
                      "--dry_run=true", f"--output_dir={tmp_path}", "--", "--trainer.default_root_dir", "X"])


STUDY_CONFIGS = sorted(p.name for p in CONFIGS.glob("study_*.yaml"))
#: Study configs that list only what differs from a base study config, and that base.
STUDY_BASES = {"study_progression.yaml": "study_fashion_mnist.yaml", "study_cifar100.yaml": "study_cifar10.yaml"}


def test_study_configs_exist() -> None:
    expected = {"study_fashion_mnist.yaml", "study_progression.yaml", "study_cifar10.yaml", "study_cifar100.yaml",
                "study_imagenet100.yaml"}
    assert expected <= set(STUDY_CONFIGS)


@pytest.mark.parametrize("config", STUDY_CONFIGS)
def test_every_study_config_checks_out(data: Path, tmp_path: Path, config: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """`train.py study --config <base> --config <study> --dry_run true -- <fake data>` builds every variant (its
    net arguments included) and prints its commands, one fit per variant x seed."""
    accept_fake_cifar(monkeypatch, data / "cifar")
    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    stack = [CONFIGS / STUDY_BASES[config]] if config in STUDY_BASES else []
    stack.append(CONFIGS / config)
    study: dict = {}
    for path in stack:
        study.update(yaml.safe_load(path.read_text()))
    fit_config = CONFIGS / study["fit_config"][0]
    cli_main(["study", *[a for path in stack for a in ("--config", str(path))], "--dry_run=true",
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


class TestAtomicReports:
    def test_failed_write_keeps_old_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A failure before the rename leaves the previous content and no temp file."""
        target = atomic_write(tmp_path / "results.json", "old\n")

        def broken_replace(src: str, dst: str) -> None:
            raise OSError("interrupted")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="interrupted"):
            atomic_write(target, "new\n")
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    def test_failed_report_writes_nothing(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The report is rendered before any file is replaced: a plotting failure leaves the old report whole."""
        runs = [{"variant": "learned", "seed": 0, "num_params": 10, "fit_seconds": 1.0,
                 "results": [{"resolution": 28, "top1": 0.5}]}]
        settings = {"fit_config": ["x.yaml"], "seeds": [0], "train_resolution": 28}
        training.report.write_study_report(tmp_path, runs, settings)
        def contents() -> dict[str, bytes]:
            return {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

        before = contents()

        def broken_plot(*args, **kwargs) -> bytes:
            raise KeyboardInterrupt

        monkeypatch.setattr(training.report, "study_plot", broken_plot)
        runs[0]["results"][0]["top1"] = 0.9
        with pytest.raises(KeyboardInterrupt):
            training.report.write_study_report(tmp_path, runs, settings)
        assert contents() == before


REPORT_WRITER = """
import sys
from training.report import write_report_files  # training/__init__ imports lightning only on first use
folder = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_report_files(folder, {"results.json": f'{{"write": {i}}}\\n' * 2000, "results.md": f"write {i}\\n" * 2000,
                                "accuracy_vs_resolution.png": bytes([i % 256]) * 50_000})
"""


def test_report_pair_consistent_under_kill_9(tmp_path: Path) -> None:
    """kill -9 at random moments of repeated report writes: results.json and results.md always come from the
    same write, and the next write leaves no temp file or stale version behind."""
    import random

    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", REPORT_WRITER, str(tmp_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if not (tmp_path / "results.json").exists():
            continue
        json_write = json.loads((tmp_path / "results.json").read_text().splitlines()[0])["write"]
        md_write = int((tmp_path / "results.md").read_text().splitlines()[0].split()[1])
        png_write = (tmp_path / "accuracy_vs_resolution.png").read_bytes()
        assert json_write == md_write and set(png_write) == {json_write % 256}
        seen.add(json_write)
    assert seen  # at least one kill landed after a complete write
    training.report.write_report_files(tmp_path, {"results.json": "{}", "results.md": "x"})
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(leftovers) == 2 and ".report-current" in leftovers  # the current version and its link, nothing else
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "results.md").read_text() == "x"


def test_summary_mean_and_sample_std() -> None:
    runs = [
        {"variant": "v", "resolution_mode": "ntk", "seed": s, "results": [{"resolution": 28, "top1": acc, "top5": 1.0}]}
        for s, acc in enumerate([0.5, 0.7, 0.9])
    ]
    top1, top5 = summarize(runs)
    assert (top1["label"], top1["metric"], top1["n"], top1["protocol"]) == ("v (ntk)", "top1", 3, "zoom")
    assert top1["mean"] == pytest.approx(0.7, abs=1e-12)
    assert top1["std"] == pytest.approx(0.2, abs=1e-12)  # sample std (ddof=1) of 0.5, 0.7, 0.9
    assert (top5["mean"], top5["std"]) == (1.0, 0.0)


@pytest.mark.slow
def test_study_command_in_subprocesses(data: Path, tmp_path: Path) -> None:
    """The real command: `python train.py study --config ... -- <budget>` with one subprocess per fit and test."""
    study = tmp_path / "study.yaml"
    study.write_text(f"fit_config: [{FASHION}]\nvariants: [learned, rope_mixed]\nseeds: [0]\n"
                     f"eval_resolutions: [24, 28]\neval_protocols: [zoom]\noutput_dir: {tmp_path / 'report'}\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "study", "--config", str(study), "--",
                             *budget(data)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(r["variant"], [x["resolution"] for x in r["results"]]) for r in results["runs"]] == [
        ("learned", [24, 28]), ("rope_mixed", [24, 28])]
    assert "### top-1 accuracy (%), zoom" in result.stdout
