"""Result files: atomic writes, the multi-resolution eval report, and the study report (JSON, markdown, PNG).

Every file is written whole or not at all (temp file in the same folder + ``os.replace``), and a study
report is rendered completely in memory before the first file is replaced.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

METRIC_TITLES = {"top1": "top-1", "top5": "top-5"}


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``; on any error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _metric_names(results: dict[int, dict[str, float]]) -> list[str]:
    return [name for name in METRIC_TITLES if any(name in values for values in results.values())]


def format_eval_table(results: dict[int, dict[str, float]], patch_size: int, train_resolution: int) -> str:
    """Accuracy (%) per evaluation resolution; ``results`` maps resolution -> {"top1": fraction, ...}."""
    names = _metric_names(results)
    header = ["resolution", "grid"] + [f"{METRIC_TITLES[n]} (%)" for n in names]
    rows = []
    for resolution, values in sorted(results.items()):
        side = resolution // patch_size
        mark = " (train)" if resolution == train_resolution else ""
        rows.append([f"{resolution}{mark}", f"{side}x{side}"] + [f"{100 * values[n]:.2f}" for n in names])
    return markdown_table(header, rows)


def write_eval_report(
    folder: str | os.PathLike, results: dict[int, dict[str, float]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``eval.json`` ({"meta", "results": [{"resolution", "top1", ...}]}) and ``eval.csv``; return both paths."""
    folder = Path(folder)
    names = _metric_names(results)
    records = [{"resolution": r, **{n: results[r][n] for n in names}} for r in sorted(results)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["resolution", *names], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    json_path = atomic_write(folder / "eval.json", json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    csv_path = atomic_write(folder / "eval.csv", text.getvalue())
    return json_path, csv_path


def run_label(run: dict[str, Any]) -> str:
    """Row name of a tested run: the variant, with the resolution mode when one was set ("rope_axial (ntk)")."""
    mode = run.get("resolution_mode")
    return f"{run['variant']} ({mode})" if mode else run["variant"]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (0 for one seed) over seeds, per row (variant, resolution mode) x resolution x metric.

    ``runs``: [{"variant", "resolution_mode" (optional), "seed", "results": [{"resolution", "top1", ...}]}];
    returns [{"label", "variant", "resolution_mode", "resolution", "metric", "mean", "std", "n"}] in the
    order rows first appear in ``runs``, then by resolution.
    """
    groups: dict[tuple[str, int, str], list[float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = run_label(run)
        rows.setdefault(label, {"variant": run["variant"], "resolution_mode": run.get("resolution_mode")})
        for record in run["results"]:
            for metric in METRIC_TITLES:
                if metric in record:
                    groups.setdefault((label, record["resolution"], metric), []).append(record[metric])
    order = {label: i for i, label in enumerate(rows)}
    summary = []
    for (label, resolution, metric), values in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(
            {"label": label, **rows[label], "resolution": resolution, "metric": metric,
             "mean": statistics.fmean(values), "std": std, "n": len(values)}
        )
    return summary


def study_markdown(summary: list[dict[str, Any]], runs: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The study's tables: accuracy (%) mean ± std per row (variant, mode) x evaluation resolution (columns)."""
    labels = list(dict.fromkeys(s["label"] for s in summary))
    resolutions = sorted({s["resolution"] for s in summary})
    cell = {(s["label"], s["resolution"], s["metric"]): s for s in summary}
    train_res = settings["train_resolution"]
    seeds = settings["seeds"]
    parts = [
        "# Position encoding study\n",
        f"Training config: {', '.join(settings['fit_config'])}; trained at {train_res}px, "
        f"evaluated at {', '.join(map(str, resolutions))}px; seeds {seeds}. "
        "Cells are accuracy in %, mean ± sample std over seeds; (train) marks the training resolution.\n",
    ]
    if any(s["resolution_mode"] for s in summary):
        parts.append(
            "RoPE rows name the resolution mode of their positions at other grids (`vit.set_resolution_mode`).\n"
        )
    if settings.get("fit_args"):
        parts.append(f"Options added to every fit: `{' '.join(settings['fit_args'])}`\n")
    header = ["pos_embed"] + [f"{r}{' (train)' if r == train_res else ''}" for r in resolutions]
    for metric, title in METRIC_TITLES.items():
        if not any(key[2] == metric for key in cell):
            continue
        rows = [
            [label] + [
                f"{100 * cell[label, r, metric]['mean']:.2f} ± {100 * cell[label, r, metric]['std']:.2f}"
                for r in resolutions
            ]
            for label in labels
        ]
        parts.append(f"## {title} accuracy (%)\n\n" + markdown_table(header, rows))
    fits = {(r["variant"], r["seed"]): r for r in runs}
    timing = [[v, seed, f"{r['num_params']:,}", f"{r['fit_seconds'] / 60:.1f}"] for (v, seed), r in fits.items()]
    parts.append("## Runs\n\n" + markdown_table(["pos_embed", "seed", "parameters", "fit (min)"], timing))
    return "\n".join(parts)


def study_plot(summary: list[dict[str, Any]], train_resolution: int, metric: str = "top1") -> bytes:
    """PNG of accuracy (%) against evaluation resolution, one line per row (variant, mode) with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label in dict.fromkeys(s["label"] for s in summary):
        points = sorted(
            (s["resolution"], s["mean"], s["std"]) for s in summary if s["label"] == label and s["metric"] == metric
        )
        res = [p[0] for p in points]
        mean = [100 * p[1] for p in points]
        std = [100 * p[2] for p in points]
        ax.plot(res, mean, marker="o", label=label)
        ax.fill_between(res, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.axvline(train_resolution, color="gray", linestyle=":", label=f"train ({train_resolution}px)")
    ax.set_xticks(sorted({s["resolution"] for s in summary}))
    ax.set_xlabel("evaluation resolution (px)")
    ax.set_ylabel(f"{METRIC_TITLES[metric]} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_study_report(
    folder: str | os.PathLike, runs: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Path]:
    """Render results.json, results.md and accuracy_vs_resolution.png in memory, then write each atomically."""
    folder = Path(folder)
    summary = summarize(runs)
    files = {
        "results.json": json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=2) + "\n",
        "results.md": study_markdown(summary, runs, settings),
        "accuracy_vs_resolution.png": study_plot(summary, settings["train_resolution"]),
    }
    return {name: atomic_write(folder / name, data) for name, data in files.items()}
