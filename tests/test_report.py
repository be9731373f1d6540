"""training.report: atomic files, the study report's statistics, verdict, plot and timings, and how its files are
published (plain files, mode 0644 less the umask, together)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import training.files
import training.report
from training.files import atomic_write
from training.report import (
    Comparison,
    comparisons,
    paired_differences,
    study_figure,
    summarize,
    variant_references,
    verdict,
    verdict_markdown,
    write_eval_report,
    write_report_files,
    write_study_report,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = ["accuracy_vs_resolution.png", "results.json", "results.md"]

#: Per-seed top-1 of a 3-seed study, by row (variant, mode) and (protocol, resolution). rope_axial's interpolate
#: rows are learned + a chosen difference per seed, so every verdict below can be checked by hand.
LEARNED = {("zoom", 20): [0.60, 0.62, 0.64], ("zoom", 28): [0.70, 0.71, 0.72], ("zoom", 36): [0.66, 0.65, 0.67],
           ("canvas", 20): [0.40, 0.45, 0.50], ("canvas", 28): [0.70, 0.71, 0.72], ("canvas", 36): [0.40, 0.41, 0.42]}
INTERPOLATE_MINUS_LEARNED = {
    ("zoom", 20): [0.03, 0.04, 0.05],  # every seed, mean 4.0 > std 1.0: better
    ("zoom", 28): [0.02, 0.03, 0.04],  # the training size: zoom and canvas test the same images
    ("zoom", 36): [0.05, -0.01, 0.04],  # one seed worse: not established
    ("canvas", 20): [-0.03, -0.04, -0.05],  # every seed, beyond the spread: worse
    ("canvas", 28): [0.02, 0.03, 0.04],
    ("canvas", 36): [0.001, 0.002, 0.05],  # every seed better, but mean 1.77 < std 2.80: not established
}
EXTRAPOLATE_MINUS_LEARNED = {key: [0.02, 0.03, 0.04] if key[1] == 28 else [-0.20, -0.25, -0.30] for key in LEARNED}
SETTINGS = {"fit_config": ["configs/fashion_mnist.yaml"], "seeds": [0, 1, 2], "train_resolution": 28,
            "baseline": "learned", "wall_seconds": 725.0, "run_seconds": 1400.0}


def run(variant: str, seed: int, values: dict[tuple[str, int], float], mode: str | None = None) -> dict:
    results = [{"protocol": p, "resolution": r, "top1": v} for (p, r), v in values.items()]
    return {"variant": variant, "seed": seed, "resolution_mode": mode, "fit_seconds": 60.0 * (seed + 1),
            "num_params": 1000, "train_resolution": 28, "results": results}


def study_runs(seeds: int = 3) -> list[dict]:
    runs = []
    for seed in range(seeds):
        learned = {key: values[seed] for key, values in LEARNED.items()}
        runs.append(run("learned", seed, learned))
        for mode, minus in (("extrapolate", EXTRAPOLATE_MINUS_LEARNED), ("interpolate", INTERPOLATE_MINUS_LEARNED)):
            runs.append(run("rope_axial", seed, {key: learned[key] + minus[key][seed] for key in learned}, mode))
    return runs


def verdict_lines(markdown: str) -> dict[str, str]:
    """{"row − baseline": its verdict line} from the verdict section of results.md."""
    section = markdown.split("## Verdict")[1].split("\n## ")[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^- `(.+?)` − `.+?`: .*$", section, re.M)}


class TestVerdictRule:
    @pytest.mark.parametrize(
        ("differences", "expected"),
        [
            ([0.03, 0.04, 0.05], "better"),  # every seed, mean 0.04 > std 0.01
            ([-0.03, -0.04, -0.05], "worse"),
            ([0.02, 0.02], "better"),  # std 0
            ([0.001, 0.002, 0.05], "not established"),  # every seed better, mean 0.0177 < std 0.0280
            ([0.05, 0.04, -0.01], "not established"),  # one seed worse
            ([0.0, 0.0, 0.0], "not established"),
            ([0.05], "not established"),  # one seed never establishes anything
        ],
    )
    def test_better_or_worse_only_in_every_seed_and_beyond_the_spread(self, differences, expected) -> None:
        assert verdict(differences) == expected


class TestComparisons:
    def test_every_row_against_the_baseline_row_with_the_same_mode(self) -> None:
        runs = [run("learned", 0, {("zoom", 28): 0.5})]
        runs += [run(v, 0, {("zoom", 28): 0.6}, mode) for v in ("rope_axial", "rope_mixed")
                 for mode in ("extrapolate", "interpolate")]
        assert comparisons(runs, "learned") == [
            Comparison(f"{v} ({mode})", "learned", "against the baseline `learned`")
            for v in ("rope_axial", "rope_mixed") for mode in ("extrapolate", "interpolate")
        ]
        against_rope = comparisons(runs, "rope_axial")  # a baseline tested in several modes: matched by mode
        assert [(c.row, c.baseline) for c in against_rope] == [
            ("rope_mixed (extrapolate)", "rope_axial (extrapolate)"),
            ("rope_mixed (interpolate)", "rope_axial (interpolate)"),
        ]  # learned has no mode, so no rope_axial row matches it

    def test_a_variant_with_its_own_net_arguments_is_compared_with_the_variant_it_extends(self) -> None:
        runs = [run(v, 0, {("zoom", 28): 0.5}, mode) for v in ("rope_axial", "rope_axial_aug")
                for mode in ("extrapolate", "interpolate")]
        net_args = {"rope_axial_aug": {"pos_embed": "rope_axial", "rope_jitter": 1.2}}
        references = variant_references(runs, net_args)
        assert references == {"rope_axial_aug": "rope_axial"}
        assert variant_references(runs[2:], net_args) == {}  # rope_axial itself not studied: nothing to compare with
        assert comparisons(runs, None, references) == [
            Comparison(f"rope_axial_aug ({mode})", f"rope_axial ({mode})", "against the variant it extends")
            for mode in ("extrapolate", "interpolate")
        ]

    def test_differences_are_per_seed_over_the_seeds_both_rows_have(self) -> None:
        runs = [run("learned", s, {("zoom", 20): v}) for s, v in enumerate([0.50, 0.60, 0.70])]
        runs += [run("rope_axial", s, {("zoom", 20): v}) for s, v in [(0, 0.55), (2, 0.69), (3, 0.9)]]
        (d,) = paired_differences(runs, comparisons(runs, "learned"))
        assert d["seeds"] == [0, 2] and d["wins"] == 1
        assert d["differences"] == pytest.approx([0.05, -0.01], abs=1e-12)
        assert d["mean"] == pytest.approx(0.02, abs=1e-12)
        assert d["std"] == pytest.approx(0.06 / 2**0.5, abs=1e-12)
        assert d["verdict"] == "not established"


class TestVerdictParagraph:
    def test_the_report_opens_with_the_verdict_where_each_row_wins_or_loses(self, tmp_path: Path) -> None:
        markdown = write_study_report(tmp_path, study_runs(), SETTINGS)["results.md"].read_text()
        assert markdown.startswith("# Position encoding study\n\n## Verdict\n")
        assert "only when it is better (worse) in every seed and the mean of the per-seed differences is larger " \
               "than their sample std" in markdown.split("## Setup")[0]
        lines = verdict_lines(markdown)
        assert lines["rope_axial (interpolate)"] == (
            "- `rope_axial (interpolate)` − `learned`: "
            "**better** at 2 of 5 places, in every seed (+3.0 to +4.0 points): 28px (train), zoom 20px; "
            "**worse** at 1 of 5 places, in every seed (-4.0 ± 1.0 points): canvas 20px; "
            "not established at 2 of 5 places [seeds better, mean ± std]: zoom 36px [2/3, +2.7 ± 3.2], "
            "canvas 36px [3/3, +1.8 ± 2.8]."
        )
        assert lines["rope_axial (extrapolate)"].startswith(
            "- `rope_axial (extrapolate)` − `learned`: **better** at 1 of 5 places, in every seed (+3.0 ± 1.0 "
            "points): 28px (train); **worse** at 4 of 5 places, in every seed (-25.0 points each): zoom 20 and "
            "36px, canvas 20 and 36px."
        )

    def test_a_mean_that_rounds_to_zero_has_no_minus_sign(self) -> None:
        runs = [run(v, s, {("zoom", 20): a}) for s, (x, y) in enumerate([(0.5, 0.5112), (0.6, 0.5887), (0.7, 0.7)])
                for v, a in (("learned", x), ("rope_axial", y))]
        text = verdict_markdown(paired_differences(runs, comparisons(runs, "learned")), 28)
        assert "zoom 20px [1/3, +0.0 ± 1.1]" in text

    def test_one_seed_establishes_nothing(self, tmp_path: Path) -> None:
        markdown = write_study_report(tmp_path, study_runs(seeds=1), {**SETTINGS, "seeds": [0]})["results.md"]
        verdict_section = markdown.read_text().split("## Verdict")[1].split("## Setup")[0]
        assert "With one seed no difference is established" in verdict_section
        assert "**better**" not in verdict_section and "**worse**" not in verdict_section

    def test_without_a_baseline_the_verdict_says_there_is_no_comparison(self, tmp_path: Path) -> None:
        markdown = write_study_report(tmp_path, study_runs(), {**SETTINGS, "baseline": None})["results.md"]
        assert "No comparison: the study's `baseline` is not one of its variants" in markdown.read_text()

    def test_a_new_kind_of_comparison_adds_its_verdict_table_and_plot_row(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A remedy evaluated as an option of its own (a second evaluation option) compared with the same row
        without it: the verdict, tables and plot take it as one more comparison group."""
        monkeypatch.setattr(training.report, "ROW_OPTIONS", ("resolution_mode", "attention_scale"))
        runs = []
        for seed, base in enumerate([0.50, 0.52, 0.54]):
            runs.append(run("rope_axial", seed, {("canvas", 28): base + 0.2, ("canvas", 44): base}, "interpolate"))
            runs.append({**run("rope_axial", seed, {("canvas", 28): base + 0.2, ("canvas", 44): base + 0.05 + 0.01 * seed},
                               "interpolate"), "attention_scale": "log-length"})
        pairs = [Comparison("rope_axial (interpolate, log-length)", "rope_axial (interpolate)",
                            "against the same row without the entropy scale")]
        differences = paired_differences(runs, pairs)
        assert [(d["resolution"], d["verdict"]) for d in differences] == [(28, "not established"), (44, "better")]
        text = verdict_markdown(differences, 28)
        assert "**Against the same row without the entropy scale**" in text
        assert "**better** at 1 of 2 places, in every seed (+6.0 ± 1.0 points): canvas 44px" in text
        figure = study_figure(summarize(runs), 28, differences)
        assert len(figure.axes) == 2  # one protocol: accuracy, then the new group's differences
        figure.clf()


class TestPlot:
    @pytest.fixture
    def figure(self) -> object:
        import matplotlib.pyplot as plt

        runs = study_runs()
        figure = study_figure(summarize(runs), 28, paired_differences(runs, comparisons(runs, "learned")), title="T")
        yield figure
        plt.close(figure)

    @staticmethod
    def lines(ax) -> dict[str, object]:
        """{label: the data line} of an axes' error-bar plots."""
        return {c.get_label(): c.lines[0] for c in ax.containers}

    def test_one_title_one_legend_and_one_y_range_per_row_of_panels(self, figure) -> None:
        assert figure.get_suptitle() == "T"
        assert len(figure.legends) == 1 and all(ax.get_legend() is None for ax in figure.axes)
        (accuracy_zoom, accuracy_canvas), (difference_zoom, difference_canvas) = [figure.axes[:2], figure.axes[2:]]
        assert accuracy_zoom.get_ylim() == accuracy_canvas.get_ylim()
        assert difference_zoom.get_ylim() == difference_canvas.get_ylim()
        legend = [text.get_text() for text in figure.legends[0].get_texts()]
        assert legend == ["learned", "rope_axial", "mode: extrapolate", "mode: interpolate", "training resolution"]

    def test_colour_names_the_variant_and_line_style_the_mode(self, figure) -> None:
        lines = self.lines(figure.axes[0])
        learned, extrapolate, interpolate = (lines[k] for k in ("learned", "rope_axial (extrapolate)",
                                                                  "rope_axial (interpolate)"))
        assert extrapolate.get_color() == interpolate.get_color() != learned.get_color()
        assert extrapolate.get_linestyle() != interpolate.get_linestyle()
        # equal points (both modes agree at the training size) are drawn side by side, not on top of each other
        assert extrapolate.get_xdata()[1] != interpolate.get_xdata()[1]
        expected = [100 * (sum(LEARNED["zoom", r]) + sum(EXTRAPOLATE_MINUS_LEARNED["zoom", r])) / 3 for r in (20, 28, 36)]
        assert list(extrapolate.get_ydata()) == pytest.approx(expected, abs=1e-9)

    def test_difference_panel_shows_the_mean_paired_difference(self, figure) -> None:
        line = self.lines(figure.axes[2])["rope_axial (interpolate) − learned"]
        expected = [100 * sum(INTERPOLATE_MINUS_LEARNED["zoom", r]) / 3 for r in (20, 28, 36)]
        assert list(line.get_ydata()) == pytest.approx(expected, abs=1e-9)
        assert list(line.get_xdata()) == pytest.approx([20, 28, 36], abs=2)  # nudged by less than a quarter step


class TestTimings:
    def test_rerunning_a_finished_study_keeps_its_timings(self, tmp_path: Path) -> None:
        """A rerun that reuses every run (run_seconds 0) writes the same report: the time the study took, not
        the rerun's own 0.0 min."""
        first = {name: p.read_bytes() for name, p in write_study_report(tmp_path, study_runs(), SETTINGS).items()}
        files = write_study_report(tmp_path, study_runs(), {**SETTINGS, "wall_seconds": 2.0, "run_seconds": 0.0})
        markdown = files["results.md"].read_text()
        assert "0.0 min" not in markdown and "interrupted" not in markdown
        assert {name: p.read_bytes() for name, p in files.items()} == first
        assert "Wall time of the study command that ran these runs: 12.1 min (its fit and test runs: 23.3 min" in markdown

    def test_a_rerun_that_ran_something_reports_its_own_time(self, tmp_path: Path) -> None:
        write_study_report(tmp_path, study_runs(), SETTINGS)
        files = write_study_report(tmp_path, study_runs(), {**SETTINGS, "wall_seconds": 42.0, "run_seconds": 30.0})
        assert "ran these runs: 0.7 min (its fit and test runs: 0.5 min" in files["results.md"].read_text()

    def test_runs_all_reused_without_a_published_report_are_named_as_such(self, tmp_path: Path) -> None:
        files = write_study_report(tmp_path, study_runs(), {**SETTINGS, "wall_seconds": 2.0, "run_seconds": 0.0})
        markdown = files["results.md"].read_text()
        assert "Every run was reused from earlier study commands; writing this report took 0.0 min." in markdown
        assert "Fit time recorded by the 6 runs, summed: 12.0 min." in markdown  # 2 variants x (1 + 2 + 3) min


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


def test_every_file_of_one_write_names_the_same_report(tmp_path: Path) -> None:
    """results.json's report_id, the last line of results.md and the PNG's Description agree, and the same data
    renders the same bytes."""
    files = write_study_report(tmp_path, study_runs(), SETTINGS)
    report_id = json.loads(files["results.json"].read_text())["report_id"]
    assert re.fullmatch(r"[0-9a-f]{12}", report_id)
    assert files["results.md"].read_text().splitlines()[-1].startswith(f"Report `{report_id}`: ")
    assert Image.open(files["accuracy_vs_resolution.png"]).text["Description"] == f"report {report_id}"
    other = write_study_report(tmp_path / "again", study_runs(), SETTINGS)
    assert all(other[name].read_bytes() == files[name].read_bytes() for name in NAMES)


class TestPublishing:
    @pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o644)])
    def test_files_users_read_are_plain_files_with_mode_0644_less_the_umask(self, tmp_path: Path, umask: int,
                                                                           mode: int) -> None:
        previous = os.umask(umask)
        try:
            files = write_study_report(tmp_path, study_runs(), SETTINGS)
            eval_files = write_eval_report(tmp_path / "test", {("zoom", 28): {"top1": 0.5}}, {"checkpoint": "x"})
        finally:
            os.umask(previous)
        for path in [*files.values(), *eval_files]:
            assert path.is_file() and not path.is_symlink(), path
            assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*NAMES, "test"])  # nothing hidden beside them

    def test_a_folder_published_through_symlinks_becomes_plain_files(self, tmp_path: Path) -> None:
        version = tmp_path / f".report-{'ab' * 16}"
        version.mkdir()
        for name in NAMES:
            (version / name).write_text("old")
            (tmp_path / name).symlink_to(f".report-current/{name}")
        (tmp_path / ".report-current").symlink_to(version.name)
        (tmp_path / f".report-current.{'cd' * 16}.tmp").symlink_to(version.name)
        files = write_study_report(tmp_path, study_runs(), SETTINGS)
        assert sorted(p.name for p in tmp_path.iterdir()) == NAMES
        assert all(not p.is_symlink() for p in files.values())
        assert files["results.md"].read_text().startswith("# Position encoding study")

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
        write_study_report(tmp_path, runs, settings)
        before = self.contents(tmp_path)

        def broken_plot(*args, **kwargs) -> bytes:
            raise KeyboardInterrupt

        monkeypatch.setattr(training.report, "study_plot", broken_plot)
        runs[0]["results"][0]["top1"] = 0.9
        with pytest.raises(KeyboardInterrupt):
            write_study_report(tmp_path, runs, settings)
        assert self.contents(tmp_path) == before

    def test_disk_full_while_staging_keeps_the_previous_report(self, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
        write_report_files(tmp_path, {name: f"old {name}" for name in NAMES})
        before = self.contents(tmp_path)
        real_write_all, calls = training.files._write_all, []

        def second_write_fails(fd: int, data: bytes) -> None:
            calls.append(len(data))
            if len(calls) == 2:
                real_write_all(fd, bytes(data[:1]))
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_all(fd, data)

        monkeypatch.setattr(training.files, "_write_all", second_write_fails)
        with pytest.raises(OSError, match="No space left"):
            write_report_files(tmp_path, {name: f"new {name}" for name in NAMES})
        assert self.contents(tmp_path) == before

    @pytest.mark.parametrize("when", ["before the first rename", "after the first rename"])
    def test_an_interrupt_while_publishing_never_leaves_a_mix(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              when: str) -> None:
        """Ctrl-C before the first rename keeps the old files; after it, the other renames are completed first."""
        write_report_files(tmp_path, {name: f"old {name}" for name in NAMES})
        real_replace, calls = os.replace, []

        def interrupted_replace(src: str, dst: str) -> None:
            calls.append(dst)
            if len(calls) == 1 and when == "before the first rename":
                raise KeyboardInterrupt
            real_replace(src, dst)
            if len(calls) == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", interrupted_replace)
        with pytest.raises(KeyboardInterrupt):
            write_report_files(tmp_path, {name: f"new {name}" for name in NAMES})
        expected = "old" if when == "before the first rename" else "new"
        assert self.contents(tmp_path) == {name: f"{expected} {name}".encode() for name in NAMES}

    def test_publishes_where_the_filesystem_has_no_hard_links(self, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        write_report_files(tmp_path, {name: f"old {name}" for name in NAMES})

        def no_hard_links(src: str, dst: str) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_hard_links)
        write_report_files(tmp_path, {name: f"new {name}" for name in NAMES})
        assert self.contents(tmp_path) == {name: f"new {name}".encode() for name in NAMES}

    @staticmethod
    def contents(folder: Path) -> dict[str, bytes]:
        """Every entry in ``folder`` (hidden ones included) with its bytes."""
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


REPORT_WRITER = """
import sys
from training import report  # the package's __init__ loads nothing heavy until asked
folder = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    i += 1
    report.write_report_files(folder, {"results.json": f'{{"write": {i}}}\\n' * 2000,
                                       "results.md": f"write {i}\\n" * 2000,
                                       "accuracy_vs_resolution.png": bytes([i % 256]) * 50_000})
"""


def test_report_files_whole_under_kill_9(tmp_path: Path) -> None:
    """kill -9 at random moments of repeated report writes: each file is always one write's whole content, and the
    next write leaves no temp file behind."""
    rng = random.Random(0)
    complete = 0
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", REPORT_WRITER, str(tmp_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if not (tmp_path / "results.json").exists():
            continue
        json_lines = (tmp_path / "results.json").read_text().splitlines()
        md_lines = (tmp_path / "results.md").read_text().splitlines()
        png = (tmp_path / "accuracy_vs_resolution.png").read_bytes()
        assert len(json_lines) == len(md_lines) == 2000 and len(png) == 50_000
        assert len(set(json_lines)) == len(set(md_lines)) == len(set(png)) == 1
        complete += 1
    assert complete  # at least one kill landed after a complete write
    write_report_files(tmp_path, {"results.json": "{}", "results.md": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == NAMES  # no hidden temp file of any report file
    assert (tmp_path / "results.md").read_text() == "x"
