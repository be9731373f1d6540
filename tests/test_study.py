"""training.study / training.report: the position-encoding study end to end, its report, and its failure modes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import training.report
import training.study
from test_data import CONFIGS, accept_fake_cifar, smoke_args, write_all
from training.cli import cli_main
from training.report import atomic_write, summarize
from training.study import run_study, study_main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).resolve().parents[1]
FASHION = CONFIGS / "fashion_mnist.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


def budget(data: Path) -> list[str]:
    """The tiny identical budget of every run: 1 epoch of 2 batches of 16 Fashion-MNIST images."""
    return [*smoke_args(FASHION, data), "--data.batch_size=16", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


class InProcessRunner:
    """Stands in for the subprocess: runs the same train.py arguments through cli_main, records them."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args: list[str], what: str) -> float:
        self.calls.append(args)
        if self.fail_on and self.fail_on in what:
            raise RuntimeError(f"[study] {what} failed (exit code 1)")
        start = time.perf_counter()
        cli_main(args)
        return time.perf_counter() - start


def table_cells(markdown: str, title: str) -> dict[tuple[str, int], tuple[float, float]]:
    """{(variant, resolution): (mean, std)} parsed from the markdown table under ``## <title>``."""
    section = markdown.split(f"## {title}")[1].split("##")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    resolutions = [int(re.match(r"\s*(\d+)", cell).group(1)) for cell in lines[0].strip("|").split("|")[1:]]
    cells = {}
    for line in lines[2:]:
        variant, *values = [c.strip() for c in line.strip("|").split("|")]
        for resolution, value in zip(resolutions, values):
            mean, std = value.split(" ± ")
            cells[variant, resolution] = (float(mean), float(std))
    return cells


def test_study_end_to_end(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 variants x 1 seed: report files exist, the table equals results.json, which equals each run's eval.json.

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
    assert "--model.net.pos_embed" in runner.calls[0] and "rope_axial" in runner.calls[0]
    assert [args[-1] for args in runner.calls[1:]] == ["extrapolate", "interpolate"]
    assert sorted(files) == ["accuracy_vs_resolution.png", "results.json", "results.md"]
    assert files["accuracy_vs_resolution.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads(files["results.json"].read_text())
    assert results["settings"]["train_resolution"] == 28
    for run in results["runs"]:
        folder = "test" if run["resolution_mode"] is None else f"test-{run['resolution_mode']}"
        eval_report = json.loads((Path(run["run_dir"]) / folder / "eval.json").read_text())
        assert run["results"] == eval_report["results"]
        assert eval_report["meta"]["resolution_mode"] == run["resolution_mode"]
    summary = {(s["label"], s["resolution"]): s for s in results["summary"] if s["metric"] == "top1"}
    rows = ("learned", "rope_axial (extrapolate)", "rope_axial (interpolate)")
    assert sorted(summary) == sorted((label, r) for label in rows for r in (20, 28, 36))
    assert summary[rows[1], 28]["mean"] == summary[rows[2], 28]["mean"]  # modes only differ off the training grid
    cells = table_cells(files["results.md"].read_text(), "top-1 accuracy (%)")
    assert sorted(cells) == sorted(summary)
    for key, (mean, std) in cells.items():
        assert mean == pytest.approx(100 * summary[key]["mean"], abs=0.005)
        assert std == 0.0 and summary[key]["n"] == 1

    again = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", again)
    run_study(**kwargs)
    assert again.calls == []  # everything finished: only the report is rewritten
    with pytest.raises(ValueError, match=r"learned-seed0 was trained by .* choose another output_dir"):
        run_study(**{**kwargs, "fit_args": [*budget(data), "--trainer.max_epochs=2"]})


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
        with pytest.raises(ValueError, match=r"unknown pos_embed \['rope_2d'\]; choose from \['learned'"):
            self.run(data, tmp_path, variants=["learned", "rope_2d"])

    def test_repeated_seed(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"seeds=\[0, 0\] must be a non-empty list without repeats"):
            self.run(data, tmp_path, seeds=[0, 0])

    def test_resolution_not_multiple_of_patch(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"\[30\] not a positive multiple of patch_size=4"):
            self.run(data, tmp_path, eval_resolutions=[28, 30])

    def test_missing_dataset(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            self.run(data, tmp_path, fit_args=[*budget(data), f"--data.root={tmp_path / 'none'}"])


STUDY_CONFIGS = sorted(p.name for p in CONFIGS.glob("study_*.yaml"))


def test_study_configs_exist() -> None:
    expected = {"study_fashion_mnist.yaml", "study_cifar10.yaml", "study_cifar100.yaml", "study_imagenet100.yaml"}
    assert expected <= set(STUDY_CONFIGS)


@pytest.mark.parametrize("config", STUDY_CONFIGS)
def test_every_study_config_checks_out(data: Path, tmp_path: Path, config: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """`train.py study --config <study> --dry_run true -- <fake data>` builds every variant and prints its commands."""
    accept_fake_cifar(monkeypatch, data / "cifar")
    runner = InProcessRunner()
    monkeypatch.setattr(training.study, "_run", runner)
    study = (CONFIGS / config).read_text()
    fit_config = CONFIGS / re.search(r"fit_config: \[(.+?)\]", study).group(1)
    study_main(["--config", str(CONFIGS / config), "--dry_run=true", f"--output_dir={tmp_path}", "--",
                *smoke_args(fit_config, data)])
    printed = capsys.readouterr().out
    variants = re.search(r"variants: \[(.+?)\]", study).group(1).split(", ")
    for variant in variants:
        assert f"--model.net.pos_embed {variant}" in printed.replace("'", "")
    seeds = re.search(r"seeds: \[(.+?)\]", study).group(1).split(",")
    assert printed.count("train.py fit") == len(variants) * len(seeds)
    assert runner.calls == []


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
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

        def broken_plot(*args, **kwargs) -> bytes:
            raise KeyboardInterrupt

        monkeypatch.setattr(training.report, "study_plot", broken_plot)
        runs[0]["results"][0]["top1"] = 0.9
        with pytest.raises(KeyboardInterrupt):
            training.report.write_study_report(tmp_path, runs, settings)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_summary_mean_and_sample_std() -> None:
    runs = [
        {"variant": "v", "resolution_mode": "ntk", "seed": s, "results": [{"resolution": 28, "top1": acc, "top5": 1.0}]}
        for s, acc in enumerate([0.5, 0.7, 0.9])
    ]
    top1, top5 = summarize(runs)
    assert (top1["label"], top1["metric"], top1["n"]) == ("v (ntk)", "top1", 3)
    assert top1["mean"] == pytest.approx(0.7, abs=1e-12)
    assert top1["std"] == pytest.approx(0.2, abs=1e-12)  # sample std (ddof=1) of 0.5, 0.7, 0.9
    assert (top5["mean"], top5["std"]) == (1.0, 0.0)


@pytest.mark.slow
def test_study_command_in_subprocesses(data: Path, tmp_path: Path) -> None:
    """The real command: `python train.py study --config ... -- <budget>` with one subprocess per fit and test."""
    study = tmp_path / "study.yaml"
    study.write_text(f"fit_config: [{FASHION}]\nvariants: [learned, rope_mixed]\nseeds: [0]\n"
                     f"eval_resolutions: [24, 28]\noutput_dir: {tmp_path / 'report'}\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "study", "--config", str(study), "--",
                             *budget(data)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(r["variant"], [x["resolution"] for x in r["results"]]) for r in results["runs"]] == [
        ("learned", [24, 28]), ("rope_mixed", [24, 28])]
    assert "## top-1 accuracy (%)" in result.stdout
