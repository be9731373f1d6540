"""Result files: the multi-resolution eval report and the study report (JSON, markdown, PNG).

Every file is written whole or not at all (`training.files.atomic_write`). The
study report's three files are one unit: they are written into a fresh hidden folder
``.report-<id>/`` and published by replacing one symlink, ``.report-current``, through which
``results.json``, ``results.md`` and ``accuracy_vs_resolution.png`` (symlinks themselves) resolve. A
reader therefore always sees the three files of one write, even after ``kill -9`` at any point, and
the next write removes whatever an interrupted one left behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import atomic_write, fsync_dir, markdown_table

METRIC_TITLES = {"top1": "top-1", "top5": "top-5"}
PROTOCOL_TEXT = {
    "zoom": "the test image is resized to the resolution: the object spans the same fraction of a larger "
    "or smaller patch grid (finer or coarser sampling of the same content)",
    "canvas": "the test image keeps its training size and sits unscaled in the centre of a blank canvas of "
    "the resolution (a centre crop below the training size): more or fewer tokens, same object size in patches",
}
REPORT_FILES = ("results.json", "results.md", "accuracy_vs_resolution.png")
CURRENT = ".report-current"


def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one atomic rename (a temp symlink replaces it)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report_files(folder: str | os.PathLike, files: dict[str, str | bytes]) -> dict[str, Path]:
    """Publish ``files`` (name -> content) in ``folder`` as one unit (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f".report-{uuid.uuid4().hex}"
    version.mkdir()
    try:
        for name, data in files.items():
            atomic_write(version / name, data)
        current = folder / CURRENT
        for name in files:  # the public names resolve through .report-current (dangling until the first publish)
            link = folder / name
            if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
                _replace_symlink(link, f"{CURRENT}/{name}")
        _replace_symlink(current, version.name)  # the one step that publishes all files together
        fsync_dir(folder)
    except BaseException:
        if not (folder / CURRENT).is_symlink() or os.readlink(folder / CURRENT) != version.name:
            shutil.rmtree(version, ignore_errors=True)
        raise
    _clean_report_folder(folder)
    return {name: folder / name for name in files}


def _clean_report_folder(folder: Path) -> None:
    """Remove report versions that are no longer current and temp links left by interrupted writes."""
    live = os.readlink(folder / CURRENT) if (folder / CURRENT).is_symlink() else None
    for entry in folder.glob(".report-*"):
        if entry.name in (CURRENT, live):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    for entry in folder.glob(".*.tmp"):
        if entry.is_symlink() or entry.is_file():
            entry.unlink(missing_ok=True)


def _metric_names(records: Iterable[dict[str, float]]) -> list[str]:
    records = list(records)
    return [name for name in METRIC_TITLES if any(name in values for values in records)]


EvalKey = tuple[str, int]  # (protocol, resolution)


def format_eval_table(results: dict[EvalKey, dict[str, float]], patch_size: int, train_resolution: int) -> str:
    """Accuracy (%) per (protocol, resolution); ``results`` maps (protocol, resolution) -> {"top1": fraction, ...}."""
    names = _metric_names(results.values())
    header = ["protocol", "resolution", "grid"] + [f"{METRIC_TITLES[n]} (%)" for n in names]
    rows = []
    for (protocol, resolution), values in results.items():
        side = resolution // patch_size
        mark = " (train)" if resolution == train_resolution else ""
        rows.append([protocol, f"{resolution}{mark}", f"{side}x{side}"] + [f"{100 * values[n]:.2f}" for n in names])
    return markdown_table(header, rows)


def write_eval_report(
    folder: str | os.PathLike, results: dict[EvalKey, dict[str, float]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``eval.json`` ({"meta", "results": [{"protocol", "resolution", "top1", ...}]}) and ``eval.csv``."""
    folder = Path(folder)
    names = _metric_names(results.values())
    records = [{"protocol": p, "resolution": r, **{n: results[p, r][n] for n in names}} for p, r in results]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["protocol", "resolution", *names], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    json_path = atomic_write(folder / "eval.json", json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    csv_path = atomic_write(folder / "eval.csv", text.getvalue())
    return json_path, csv_path


def run_label(run: dict[str, Any]) -> str:
    """Row name of a tested run: the variant, with the resolution mode when one was set ("rope_axial (ntk)")."""
    mode = run.get("resolution_mode")
    return f"{run['variant']} ({mode})" if mode else run["variant"]


def _groups(runs: list[dict[str, Any]]) -> tuple[dict[tuple[str, str, int, str], dict[int, float]], dict[str, dict]]:
    """{(label, protocol, resolution, metric): {seed: value}} and {label: {"variant", "resolution_mode"}}."""
    groups: dict[tuple[str, str, int, str], dict[int, float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = run_label(run)
        rows.setdefault(label, {"variant": run["variant"], "resolution_mode": run.get("resolution_mode")})
        for record in run["results"]:
            for metric in METRIC_TITLES:
                if metric in record:
                    key = (label, record.get("protocol", "zoom"), record["resolution"], metric)
                    values = groups.setdefault(key, {})
                    if run["seed"] in values:
                        raise ValueError(f"two results for {key} with seed {run['seed']}")
                    values[run["seed"]] = record[metric]
    return groups, rows


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (0 for one seed) over seeds, per row (variant, mode) x protocol x resolution x metric.

    ``runs``: [{"variant", "resolution_mode" (optional), "seed", "results": [{"protocol" (default "zoom"),
    "resolution", "top1", ...}]}]; returns [{"label", "variant", "resolution_mode", "protocol",
    "resolution", "metric", "mean", "std", "n", "seeds", "values"}] in the order rows first appear in
    ``runs``, then by protocol (as they appear) and resolution.
    """
    groups, rows = _groups(runs)
    order = {label: i for i, label in enumerate(rows)}
    protocols = {p: i for i, p in enumerate(dict.fromkeys(key[1] for key in groups))}
    summary = []
    for (label, protocol, resolution, metric), by_seed in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], protocols[kv[0][1]], kv[0][2], kv[0][3])
    ):
        seeds = sorted(by_seed)
        values = [by_seed[s] for s in seeds]
        summary.append(
            {"label": label, **rows[label], "protocol": protocol, "resolution": resolution, "metric": metric,
             "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
             "n": len(values), "seeds": seeds, "values": values}
        )
    return summary


def paired_differences(runs: list[dict[str, Any]], baseline: str, metric: str = "top1") -> list[dict[str, Any]]:
    """Per seed, (row - ``baseline``) for every other row, protocol and resolution; mean and sample std over seeds.

    Only seeds present in both rows are paired. Returns [{"label", "baseline", "protocol", "resolution",
    "metric", "seeds", "differences", "mean", "std", "wins"}] (``wins``: seeds where the row is better).
    """
    groups, rows = _groups(runs)
    out = []
    for label in rows:
        if label == baseline:
            continue
        for (row, protocol, resolution, name), by_seed in groups.items():
            base = groups.get((baseline, protocol, resolution, name))
            if row != label or name != metric or base is None:
                continue
            seeds = sorted(set(by_seed) & set(base))
            if not seeds:
                continue
            diffs = [by_seed[s] - base[s] for s in seeds]
            out.append(
                {"label": label, "baseline": baseline, "protocol": protocol, "resolution": resolution,
                 "metric": metric, "seeds": seeds, "differences": diffs, "mean": statistics.fmean(diffs),
                 "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0, "wins": sum(d > 0 for d in diffs)}
            )
    return out


def best_modes(summary: list[dict[str, Any]], train_resolution: int, metric: str = "top1") -> list[dict[str, Any]]:
    """Per protocol and RoPE variant tested in several resolution modes: the mode with the best mean accuracy
    averaged over the resolutions other than the training one. [{"protocol", "variant", "mode", "score", "scores"}]"""
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in summary:
        if s["metric"] == metric and s["resolution_mode"] and s["resolution"] != train_resolution:
            scores.setdefault((s["protocol"], s["variant"]), {}).setdefault(s["resolution_mode"], []).append(s["mean"])
    out = []
    for (protocol, variant), by_mode in scores.items():
        if len(by_mode) < 2:
            continue
        averaged = {mode: statistics.fmean(v) for mode, v in by_mode.items()}
        mode = max(averaged, key=averaged.get)
        out.append({"protocol": protocol, "variant": variant, "mode": mode, "score": averaged[mode], "scores": averaged})
    return out


def _pct(mean: float, std: float, signed: bool = False) -> str:
    return f"{100 * mean:{'+' if signed else ''}.2f} ± {100 * std:.2f}"


def study_markdown(summary: list[dict[str, Any]], runs: list[dict[str, Any]], settings: dict[str, Any],
                   differences: list[dict[str, Any]] | None = None) -> str:
    """The study's tables: accuracy (%) mean ± std per row (variant, mode) x resolution, one table per
    protocol (and metric), the paired differences against the baseline, the best resolution mode per
    protocol, and the runs' sizes and times."""
    labels = list(dict.fromkeys(s["label"] for s in summary))
    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    resolutions = sorted({s["resolution"] for s in summary})
    cell = {(s["label"], s["protocol"], s["resolution"], s["metric"]): s for s in summary}
    train_res = settings["train_resolution"]
    seeds = settings["seeds"]
    parts = [
        "# Position encoding study\n",
        f"Training config: {', '.join(settings['fit_config'])}; trained at {train_res}px, "
        f"evaluated at {', '.join(map(str, resolutions))}px; seeds {seeds}. "
        "Checkpoints: the final weights of each run (the validation hold-out of the training split only "
        "monitors training); the test split is used only here. "
        "Cells are accuracy in %, mean ± sample std over seeds (the value itself for one seed); (train) marks "
        "the training resolution.\n",
    ]
    samples = sorted({r["test_samples"] for r in runs if r.get("test_samples")})
    if samples:
        parts.append(f"Test images per evaluation: {', '.join(f'{n:,}' for n in samples)}.\n")
    if any(s["resolution_mode"] for s in summary):
        parts.append(
            "RoPE rows name the resolution mode of their positions at other grids (`vit.set_resolution_mode`): "
            "extrapolate = integer patch indices, interpolate = positions rescaled onto the training grid.\n"
        )
    if settings.get("variant_net_args"):
        described = "; ".join(
            f"`{name}`: " + ", ".join(f"{k}={v}" for k, v in args.items())
            for name, args in settings["variant_net_args"].items()
        )
        parts.append(f"Variants with their own net arguments: {described}.\n")
    if settings.get("fit_args"):
        parts.append(f"Options added to every fit: `{' '.join(settings['fit_args'])}`\n")
    if settings.get("wall_seconds") is not None:
        parts.append(
            f"Wall time of this study command: {settings['wall_seconds'] / 60:.1f} min "
            f"(sum of the fit and test runs it ran: {settings.get('run_seconds', 0.0) / 60:.1f} min; "
            "runs reused from an earlier, interrupted command are not counted).\n"
        )
    header = ["pos_embed"] + [f"{r}{' (train)' if r == train_res else ''}" for r in resolutions]
    for protocol in protocols:
        parts.append(f"## Protocol `{protocol}`: {PROTOCOL_TEXT.get(protocol, protocol)}.\n")
        for metric, title in METRIC_TITLES.items():
            if not any(key[1] == protocol and key[3] == metric for key in cell):
                continue
            rows = [
                [label] + [
                    (_pct(cell[key]["mean"], cell[key]["std"]) if cell[key]["n"] > 1 else f"{100 * cell[key]['mean']:.2f}")
                    if (key := (label, protocol, r, metric)) in cell else "–"
                    for r in resolutions
                ]
                for label in labels
            ]
            parts.append(f"### {title} accuracy (%), {protocol}\n\n" + markdown_table(header, rows))
    if differences:
        baseline = differences[0]["baseline"]
        diff_cell = {(d["label"], d["protocol"], d["resolution"]): d for d in differences}
        diff_labels = list(dict.fromkeys(d["label"] for d in differences))
        parts.append(
            f"## Paired differences: row − {baseline}, top-1 points\n\n"
            f"Per seed, the row's accuracy minus {baseline}'s with the same seed (same data order and "
            "initial state where the architectures allow it); mean ± sample std over seeds, and in brackets "
            "the number of seeds in which the row is better.\n"
        )
        for protocol in protocols:
            rows = [
                [label] + [
                    f"{_pct(d['mean'], d['std'], signed=True)} [{d['wins']}/{len(d['seeds'])}]"
                    if (d := diff_cell.get((label, protocol, r))) else "–"
                    for r in resolutions
                ]
                for label in diff_labels
            ]
            parts.append(f"### {protocol}\n\n" + markdown_table(header, rows))
    winners = best_modes(summary, train_res)
    if winners:
        lines = [
            f"- `{w['protocol']}`, {w['variant']}: **{w['mode']}** wins ("
            + ", ".join(f"{m} {100 * v:.2f}" for m, v in w["scores"].items())
            + " % top-1, mean over the resolutions other than the training one)"
            for w in winners
        ]
        parts.append("## Which resolution mode wins\n\n" + "\n".join(lines) + "\n")
    fits = {(r["variant"], r["seed"]): r for r in runs}
    timing = [[v, seed, f"{r['num_params']:,}", f"{r['fit_seconds'] / 60:.1f}"] for (v, seed), r in fits.items()]
    parts.append("## Runs\n\n" + markdown_table(["pos_embed", "seed", "parameters", "fit (min)"], timing))
    return "\n".join(parts)


def study_plot(summary: list[dict[str, Any]], train_resolution: int, metric: str = "top1") -> bytes:
    """PNG of accuracy (%) against evaluation resolution, one panel per protocol, one line per row
    (variant, mode) with error bars of ± one sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.4 * len(protocols), 4.6), dpi=110, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for label in dict.fromkeys(s["label"] for s in summary):
            points = sorted(
                (s["resolution"], s["mean"], s["std"])
                for s in summary
                if s["label"] == label and s["metric"] == metric and s["protocol"] == protocol
            )
            if not points:
                continue
            res = [p[0] for p in points]
            ax.errorbar(res, [100 * p[1] for p in points], yerr=[100 * p[2] for p in points], marker="o",
                        capsize=3, label=label)
        ax.axvline(train_resolution, color="gray", linestyle=":", label=f"train ({train_resolution}px)")
        ax.set_xticks(sorted({s["resolution"] for s in summary}))
        ax.set_title(f"protocol: {protocol}")
        ax.set_xlabel("evaluation resolution (px)")
        ax.set_ylabel(f"{METRIC_TITLES[metric]} accuracy (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_study_report(
    folder: str | os.PathLike, runs: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Path]:
    """Render results.json, results.md and accuracy_vs_resolution.png in memory, then publish them together."""
    summary = summarize(runs)
    baseline = settings.get("baseline")
    differences = paired_differences(runs, baseline) if baseline and any(r["variant"] == baseline for r in runs) else []
    document = {"settings": settings, "summary": summary, "paired_differences": differences, "runs": runs}
    files = {
        "results.json": json.dumps(document, indent=2) + "\n",
        "results.md": study_markdown(summary, runs, settings, differences),
        "accuracy_vs_resolution.png": study_plot(summary, settings["train_resolution"]),
    }
    return write_report_files(folder, files)
