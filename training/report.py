"""Result files: the multi-resolution eval report and the study report (JSON, markdown, PNG).

Every file is written whole or not at all (`training.files`). Files that users read are plain files with
mode 0644 less the umask. The study report's three files are published together (`write_report_files`:
`training.files.write_together`, then the leftovers of killed writes are removed). Only SIGKILL or a power
cut inside the microseconds of the renames can leave files of two writes side by side; each file names its
write (``report_id``, a hash of the report's data: in results.json, on the last line of results.md, in the
PNG's ``Description``), so such a mix is visible, and the next study command in that folder, which reuses
every finished run, rewrites all three. The trade-off: publishing through a symlink swapped by one rename
closed that window too, but every copy, archive or upload of the report then had to follow symlinks
(``cp -L``); folders written that way become plain files at the next write.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .files import atomic_write, markdown_table, write_together

METRIC_TITLES = {"top1": "top-1", "top5": "top-5"}
PROTOCOL_TEXT = {
    "zoom": "the test image is resized to the resolution: the object spans the same fraction of a larger "
    "or smaller patch grid (finer or coarser sampling of the same content)",
    "canvas": "the test image keeps its training size and sits unscaled in the centre of a blank canvas of "
    "the resolution (a centre crop below the training size): more or fewer tokens, same object size in patches",
}
REPORT_FILES = ("results.json", "results.md", "accuracy_vs_resolution.png")
LEGACY_CURRENT = ".report-current"  # the symlink of the earlier protocol; its version folders are .report-<hex>
#: Evaluation options that split one trained variant into several report rows ("rope_axial (interpolate)").
ROW_OPTIONS = ("resolution_mode", "attn_logit_scale")
VERDICT_RULE = (
    "a row is better (worse) than the row it is compared with, at one protocol and resolution, only when it "
    "is better (worse) in every seed and the mean of the per-seed differences is larger than their sample std; "
    "anything else is not established with these seeds, and one seed never establishes a difference"
)
Verdict = Literal["better", "worse", "not established"]


# ----------------------------------------------------------------------------- atomic files




def write_report_files(folder: str | os.PathLike, files: dict[str, str | bytes]) -> dict[str, Path]:
    """Publish ``files`` (name -> content) as plain files in ``folder``, together (see the module docstring)."""
    paths = write_together(folder, files)
    _remove_leftovers(Path(folder))
    return paths


def _remove_leftovers(folder: Path) -> None:
    """Remove the temp files of report writes that were killed, and what the earlier symlink protocol left:
    links into ``.report-current``, the link itself, its ``.report-<hex>`` version folders and temp links."""
    for name in REPORT_FILES:
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
        link = folder / name
        if link.is_symlink() and os.readlink(link).startswith(f"{LEGACY_CURRENT}/"):
            link.unlink()
    for entry in folder.glob(f"{LEGACY_CURRENT}*"):
        if entry.is_symlink() and (entry.name == LEGACY_CURRENT or entry.name.endswith(".tmp")):
            entry.unlink()
    for entry in folder.glob(".report-*"):
        if re.fullmatch(r"\.report-[0-9a-f]{32}", entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


# ----------------------------------------------------------------------------- the eval report of one run


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


# ----------------------------------------------------------------------------- study statistics


def run_label(run: dict[str, Any]) -> str:
    """Row name of a tested run: the variant, with its evaluation options when set ("rope_axial (interpolate)")."""
    options = [str(run[name]) for name in ROW_OPTIONS if run.get(name) is not None]
    return f"{run['variant']} ({', '.join(options)})" if options else run["variant"]


def _groups(runs: list[dict[str, Any]]) -> tuple[dict[tuple[str, str, int, str], dict[int, float]], dict[str, dict]]:
    """{(label, protocol, resolution, metric): {seed: value}} and {label: {"variant", *ROW_OPTIONS}}."""
    groups: dict[tuple[str, str, int, str], dict[int, float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = run_label(run)
        rows.setdefault(label, {"variant": run["variant"], **{name: run.get(name) for name in ROW_OPTIONS}})
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


@dataclass(frozen=True)
class Comparison:
    """Two report rows compared seed by seed (``row`` − ``baseline``), reported under the heading ``group``."""

    row: str
    baseline: str
    group: str


def variant_references(runs: list[dict[str, Any]], variant_net_args: dict[str, dict[str, Any]] | None) -> dict[str, str]:
    """{variant: the studied variant it extends}: a variant defined by net arguments (``variant_net_args``) whose
    ``pos_embed`` is itself a studied variant, e.g. {"rope_axial_aug": "rope_axial"}."""
    studied = {run["variant"] for run in runs}
    return {
        name: args["pos_embed"]
        for name, args in (variant_net_args or {}).items()
        if name in studied and args.get("pos_embed") in studied and args["pos_embed"] != name
    }


def _matching_row(rows: dict[str, dict[str, Any]], variant: str, options: dict[str, Any]) -> str | None:
    """The row of ``variant`` with the same evaluation options, or its only row (e.g. a learned table has no mode)."""
    candidates = [label for label, row in rows.items() if row["variant"] == variant]
    exact = [label for label in candidates if all(rows[label][name] == options[name] for name in ROW_OPTIONS)]
    return exact[0] if exact else candidates[0] if len(candidates) == 1 else None


def comparisons(
    runs: list[dict[str, Any]], baseline: str | None, references: dict[str, str] | None = None
) -> list[Comparison]:
    """The paired comparisons of a study, in report order.

    Every row of a variant other than ``baseline`` against the baseline's matching row (same evaluation
    options, or the baseline's only row); then every row of a variant in ``references`` (variant -> the
    variant it extends, `variant_references`) against the matching row of that variant. A row without a
    matching row is left out; then every row with an attention logit scale against the same variant's row
    without it (``attn_logit_scale`` none). New kinds of comparison are new groups here: the verdict, the
    tables and the plot take whatever this returns.
    """
    _, rows = _groups(runs)
    variants = {row["variant"] for row in rows.values()}
    plans = {f"against the baseline `{baseline}`": dict.fromkeys(variants, baseline) if baseline else {},
             "against the variant it extends": dict(references or {})}
    out = []
    for group, reference_of in plans.items():
        for label, row in rows.items():
            reference = reference_of.get(row["variant"])
            matched = _matching_row(rows, reference, row) if reference not in (None, row["variant"]) else None
            if matched is not None:
                out.append(Comparison(label, matched, group))
    for label, row in rows.items():  # an evaluation-time remedy against the same model without it
        if row.get("attn_logit_scale") not in (None, "none"):
            matched = _matching_row(rows, row["variant"], {**row, "attn_logit_scale": "none"})
            if matched not in (None, label):
                out.append(Comparison(label, matched, "the attention-entropy scale against none"))
    return out


def verdict(differences: Sequence[float]) -> Verdict:
    """`VERDICT_RULE` applied to the per-seed differences (row − baseline) at one protocol and resolution."""
    if len(differences) < 2:
        return "not established"
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    if abs(mean) > std and all(d > 0 for d in differences):
        return "better"
    if abs(mean) > std and all(d < 0 for d in differences):
        return "worse"
    return "not established"


def paired_differences(
    runs: list[dict[str, Any]], pairs: Sequence[Comparison], metric: str = "top1"
) -> list[dict[str, Any]]:
    """Per comparison (`comparisons`), protocol and resolution: per seed (row − baseline) over the seeds both
    rows have; their mean and sample std, ``wins`` (seeds in which the row is better) and the `verdict`.

    Returns [{"label", "baseline", "group", "protocol", "resolution", "metric", "seeds", "differences", "mean",
    "std", "wins", "verdict"}] in the order of ``pairs``, then of the row's results.
    """
    groups, _ = _groups(runs)
    out = []
    for pair in pairs:
        for (row, protocol, resolution, name), by_seed in groups.items():
            base = groups.get((pair.baseline, protocol, resolution, name))
            if row != pair.row or name != metric or base is None:
                continue
            seeds = sorted(set(by_seed) & set(base))
            if not seeds:
                continue
            diffs = [by_seed[s] - base[s] for s in seeds]
            out.append(
                {"label": pair.row, "baseline": pair.baseline, "group": pair.group, "protocol": protocol,
                 "resolution": resolution, "metric": metric, "seeds": seeds, "differences": diffs,
                 "mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                 "wins": sum(d > 0 for d in diffs), "verdict": verdict(diffs)}
            )
    return out


def best_modes(
    summary: list[dict[str, Any]], train_resolution: int | Sequence[int], metric: str = "top1"
) -> list[dict[str, Any]]:
    """Per protocol and RoPE variant tested in several resolution modes: the mode with the best mean accuracy
    averaged over the resolutions other than the training one. [{"protocol", "variant", "mode", "score", "scores"}]"""
    train = _train_resolutions(train_resolution)
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in summary:
        if s["metric"] == metric and s["resolution_mode"] and s["resolution"] not in train:
            scores.setdefault((s["protocol"], s["variant"]), {}).setdefault(s["resolution_mode"], []).append(s["mean"])
    out = []
    for (protocol, variant), by_mode in scores.items():
        if len(by_mode) < 2:
            continue
        averaged = {mode: statistics.fmean(v) for mode, v in by_mode.items()}
        mode = max(averaged, key=averaged.get)
        out.append({"protocol": protocol, "variant": variant, "mode": mode, "score": averaged[mode], "scores": averaged})
    return out


def _train_resolutions(train_resolution: int | Sequence[int]) -> set[int]:
    """The training resolution(s) as a set: a study whose runs trained at several sizes records a list."""
    return {train_resolution} if isinstance(train_resolution, int) else set(train_resolution)


# ----------------------------------------------------------------------------- study markdown


def _points(fraction: float, digits: int = 2, signed: bool = False) -> str:
    """A fraction in points (%), without the minus sign of a value that rounds to zero."""
    return f"{round(100 * fraction, digits) + 0.0:{'+' if signed else ''}.{digits}f}"


def _pct(mean: float, std: float, signed: bool = False, digits: int = 2) -> str:
    return f"{_points(mean, digits, signed)} ± {_points(std, digits)}"


def _and(items: Sequence[Any]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _verdict_points(diffs: list[dict[str, Any]], train: set[int]) -> list[tuple[str | None, int, dict[str, Any]]]:
    """(protocol, resolution, difference) per place of one comparison; protocol None at a training resolution
    where every protocol gave the same per-seed differences (zoom and canvas test the same images there)."""
    by_resolution: dict[int, list[dict[str, Any]]] = {}
    for d in diffs:
        by_resolution.setdefault(d["resolution"], []).append(d)
    merged, split = [], []
    for resolution in sorted(by_resolution):
        same = by_resolution[resolution]
        if resolution in train and all((d["seeds"], d["differences"]) == (same[0]["seeds"], same[0]["differences"])
                                       for d in same[1:]):
            merged.append((None, resolution, same[0]))
        else:
            split += [(d["protocol"], resolution, d) for d in same]
    order = {p: i for i, p in enumerate(dict.fromkeys(d["protocol"] for d in diffs))}
    return merged + sorted(split, key=lambda point: (order[point[0]], point[1]))


def _place(protocol: str | None, resolutions: Sequence[int]) -> str:
    return f"{protocol} {_and(resolutions)}px" if protocol else ", ".join(f"{r}px (train)" for r in resolutions)


def _places(points: list[tuple[str | None, int, dict[str, Any]]]) -> str:
    return ", ".join(_place(protocol, [p[1] for p in group])
                     for protocol, group in itertools.groupby(points, key=lambda p: p[0]))


def _verdict_line(diffs: list[dict[str, Any]], train: set[int]) -> str:
    """One comparison's verdict: where the row is better, worse, and where that is not established."""
    points = _verdict_points(diffs, train)
    clauses = []
    for outcome in ("better", "worse"):
        chosen = [p for p in points if p[2]["verdict"] == outcome]
        if not chosen:
            continue
        low, high = (_points(f(p[2]["mean"] for p in chosen), 1, signed=True) for f in (min, max))
        size = (f"{_pct(chosen[0][2]['mean'], chosen[0][2]['std'], True, 1)} points" if len(chosen) == 1
                else f"{low} points each" if low == high else f"{low} to {high} points")
        clauses.append(f"**{outcome}** at {len(chosen)} of {len(points)} places, in every seed ({size}): "
                       + _places(chosen))
    unsettled = [p for p in points if p[2]["verdict"] == "not established"]
    if unsettled:
        details = ", ".join(
            f"{_place(protocol, [resolution])} [{d['wins']}/{len(d['seeds'])}, {_pct(d['mean'], d['std'], True, 1)}]"
            for protocol, resolution, d in unsettled
        )
        clauses.append(f"not established at {len(unsettled)} of {len(points)} places [seeds better, mean ± std]: "
                       + details)
    return f"- `{diffs[0]['label']}` − `{diffs[0]['baseline']}`: " + "; ".join(clauses) + "."


def verdict_markdown(differences: list[dict[str, Any]], train_resolution: int | Sequence[int]) -> str:
    """The verdict section: per comparison group, one line per compared row (`_verdict_line`), and the rule."""
    if not differences:
        return ("## Verdict\n\nNo comparison: the study's `baseline` is not one of its variants, and no variant "
                "extends another.\n")
    train = _train_resolutions(train_resolution)
    seeds = max(len(d["seeds"]) for d in differences)
    parts = [
        f"## Verdict\n\nTop-1, paired by seed over {seeds} seed{'s' if seeds > 1 else ''} (a seed fixes the data "
        f"order and, where the architectures allow it, the initial weights). Rule: {VERDICT_RULE}.\n"
    ]
    if seeds < 2:
        parts.append("With one seed no difference is established: the paired differences below are single runs.\n")
        return "\n".join(parts)
    for group in dict.fromkeys(d["group"] for d in differences):
        in_group = [d for d in differences if d["group"] == group]
        lines = [_verdict_line([d for d in in_group if (d["label"], d["baseline"]) == pair], train)
                 for pair in dict.fromkeys((d["label"], d["baseline"]) for d in in_group)]
        parts.append(f"**{group[0].upper()}{group[1:]}**, top-1 points:\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def _timing_text(settings: dict[str, Any], runs: list[dict[str, Any]]) -> str | None:
    if settings.get("wall_seconds") is None:
        return None
    wall, ran = settings["wall_seconds"] / 60, (settings.get("run_seconds") or 0.0) / 60
    fits = {(r["variant"], r["seed"]): r["fit_seconds"] for r in runs if r.get("fit_seconds") is not None}
    if ran > 0:
        text = (f"Wall time of the study command that ran these runs: {wall:.1f} min (its fit and test runs: "
                f"{ran:.1f} min; runs it reused from an earlier command are not counted).")
    else:
        text = f"Every run was reused from earlier study commands; writing this report took {wall:.1f} min."
    return text + f" Fit time recorded by the {len(fits)} runs, summed: {sum(fits.values()) / 60:.1f} min.\n"


def study_markdown(summary: list[dict[str, Any]], runs: list[dict[str, Any]], settings: dict[str, Any],
                   differences: list[dict[str, Any]] | None = None) -> str:
    """The study's report: the verdict, the setup, accuracy (%) mean ± std per row (variant, mode) x resolution
    (one table per protocol and metric), the paired differences per comparison, the best resolution mode per
    protocol, and the runs' sizes and times."""
    differences = differences or []
    labels = list(dict.fromkeys(s["label"] for s in summary))
    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    resolutions = sorted({s["resolution"] for s in summary})
    cell = {(s["label"], s["protocol"], s["resolution"], s["metric"]): s for s in summary}
    train_res = settings["train_resolution"]
    train = _train_resolutions(train_res)
    parts = [
        "# Position encoding study\n",
        verdict_markdown(differences, train_res),
        "## Setup\n",
        f"Training config: {', '.join(settings['fit_config'])}; trained at "
        f"{_and(sorted(train))}px, evaluated at {', '.join(map(str, resolutions))}px; seeds {settings['seeds']}. "
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
            "RoPE rows name the resolution mode of their positions at other grids (`NDRopeVisionTransformer.set_resolution_mode`): "
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
    timing = _timing_text(settings, runs)
    if timing:
        parts.append(timing)
    header = ["pos_embed"] + [f"{r}{' (train)' if r in train else ''}" for r in resolutions]
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
        parts.append(
            "## Paired differences, top-1 points\n\n"
            "Per seed, the row's accuracy minus the accuracy of the row it is compared with, with the same seed; "
            "mean ± sample std over seeds, and in brackets the number of seeds in which the row is better.\n"
        )
        diff_cell = {(d["label"], d["baseline"], d["protocol"], d["resolution"]): d for d in differences}
        for group in dict.fromkeys(d["group"] for d in differences):
            pairs = list(dict.fromkeys((d["label"], d["baseline"]) for d in differences if d["group"] == group))
            for protocol in protocols:
                rows = [
                    [f"{label} − {baseline}"] + [
                        f"{_pct(d['mean'], d['std'], signed=True)} [{d['wins']}/{len(d['seeds'])}]"
                        if (d := diff_cell.get((label, baseline, protocol, r))) else "–"
                        for r in resolutions
                    ]
                    for label, baseline in pairs
                ]
                parts.append(f"### {protocol}, {group}\n\n" + markdown_table(["row − compared with", *header[1:]], rows))
    winners = best_modes(summary, train_res)
    if winners:
        lines = [
            f"- `{w['protocol']}`, {w['variant']}: **{w['mode']}** has the higher mean ("
            + ", ".join(f"{m} {100 * v:.2f}" for m, v in w["scores"].items())
            + " % top-1, mean over the resolutions other than the training one)"
            for w in winners
        ]
        parts.append("## Which resolution mode has the higher mean\n\n" + "\n".join(lines) + "\n")
    fits = {(r["variant"], r["seed"]): r for r in runs}
    timing_rows = [[v, seed, f"{r['num_params']:,}", f"{r['fit_seconds'] / 60:.1f}"] for (v, seed), r in fits.items()]
    parts.append("## Runs\n\n" + markdown_table(["pos_embed", "seed", "parameters", "fit (min)"], timing_rows))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- study plot

_DASHES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _row_styles(summary: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Per row: colour and marker by variant, line style by evaluation options (resolution mode). Returns
    ({label: style}, {variant: (colour, marker)}, {options text: line style})."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    colours = palette[0::2] + palette[1::2]  # the 10 strong colours first, then their light versions
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    by_variant = {v: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, v in enumerate(variants)}
    option_sets = list(dict.fromkeys(
        tuple(s[name] for name in ROW_OPTIONS) for s in summary if any(s[name] is not None for name in ROW_OPTIONS)
    ))
    dashes = {options: _DASHES[i % len(_DASHES)] for i, options in enumerate(option_sets)}
    styles = {}
    for s in summary:
        options = tuple(s[name] for name in ROW_OPTIONS)
        colour, marker = by_variant[s["variant"]]
        styles[s["label"]] = {"color": colour, "marker": marker, "linestyle": dashes.get(options, "-")}
    legend_dashes = {", ".join(str(v) for v in options if v is not None): dash for options, dash in dashes.items()}
    return styles, by_variant, legend_dashes


def _draw_rows(ax: Any, lines: list[tuple[str, dict[str, Any], list[tuple[int, float, float]]]], spacing: float) -> None:
    """Error-bar lines (label, style, [(resolution, mean %, std %)]), each nudged sideways so equal points stay
    visible."""
    width = 0.3 * spacing
    for i, (label, style, points) in enumerate(lines):
        offset = (i - (len(lines) - 1) / 2) * width / max(len(lines) - 1, 1)
        ax.errorbar([p[0] + offset for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    capsize=2.5, markersize=4.5, linewidth=1.4, elinewidth=1.0, label=label, **style)


def study_figure(
    summary: list[dict[str, Any]],
    train_resolution: int | Sequence[int],
    differences: list[dict[str, Any]] | None = None,
    metric: str = "top1",
    title: str | None = None,
) -> Any:
    """The study's matplotlib figure: one column per protocol; the first row of panels is accuracy (%) against
    the evaluation resolution (one line per row (variant, mode), mean ± one sample std over seeds), each further
    row the paired differences of one comparison group (mean ± sample std of the per-seed differences, in
    points). Panels of one row share their y range. Colour and marker name the variant, the line style the
    resolution mode; one legend for the figure. Close it with ``matplotlib.pyplot.close``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    summary = [s for s in summary if s["metric"] == metric]
    differences = [d for d in differences or [] if d["metric"] == metric]
    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    groups = list(dict.fromkeys(d["group"] for d in differences))
    resolutions = sorted({s["resolution"] for s in summary})
    spacing = min((b - a for a, b in itertools.pairwise(resolutions)), default=1)
    styles, by_variant, dashes = _row_styles(summary)
    fig, axes = plt.subplots(1 + len(groups), len(protocols), dpi=110, squeeze=False, sharex=True, sharey="row",
                             figsize=(5.2 * len(protocols) + 2.8, 3.4 * (1 + len(groups)) + 0.6), layout="constrained")
    name = METRIC_TITLES[metric]
    for column, protocol in enumerate(protocols):
        lines = []
        for label in dict.fromkeys(s["label"] for s in summary):
            points = sorted((s["resolution"], 100 * s["mean"], 100 * s["std"]) for s in summary
                            if s["label"] == label and s["protocol"] == protocol)
            if points:
                lines.append((label, styles[label], points))
        _draw_rows(axes[0][column], lines, spacing)
        axes[0][column].set_title(f"{protocol}: {name} accuracy")
        for row, group in enumerate(groups, start=1):
            in_group = [d for d in differences if d["group"] == group and d["protocol"] == protocol]
            lines = []
            for pair in dict.fromkeys((d["label"], d["baseline"]) for d in in_group):
                points = sorted((d["resolution"], 100 * d["mean"], 100 * d["std"]) for d in in_group
                                if (d["label"], d["baseline"]) == pair)
                lines.append((f"{pair[0]} − {pair[1]}", styles[pair[0]], points))
            axes[row][column].axhline(0.0, color="black", linewidth=0.8)
            _draw_rows(axes[row][column], lines, spacing)
            axes[row][column].set_title(f"{protocol}: paired difference {group.replace('`', '')}", fontsize="medium")
    axes[0][0].set_ylabel(f"{name} accuracy (%)")
    for row in axes[1:]:
        row[0].set_ylabel(f"{name} difference (points)")
    for ax in axes.flat:
        for resolution in _train_resolutions(train_resolution):
            ax.axvline(resolution, color="gray", linestyle=":", linewidth=1.0)
        ax.set_xticks(resolutions)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("evaluation resolution (px)")
    handles = [Line2D([], [], color=c, marker=m, label=v) for v, (c, m) in by_variant.items()]
    handles += [Line2D([], [], color="dimgray", linestyle=dash, label=f"mode: {options}") for options, dash in dashes.items()]
    handles.append(Line2D([], [], color="gray", linestyle=":", label="training resolution"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="mean ± std over seeds",
               title_fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def study_plot(
    summary: list[dict[str, Any]],
    train_resolution: int | Sequence[int],
    differences: list[dict[str, Any]] | None = None,
    metric: str = "top1",
    title: str | None = None,
    report_id: str | None = None,
) -> bytes:
    """`study_figure` as PNG bytes; ``report_id`` goes into the PNG's ``Description``."""
    fig = study_figure(summary, train_resolution, differences, metric, title)
    import matplotlib.pyplot as plt

    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png",
                    metadata={"Title": title, "Description": f"report {report_id}" if report_id else None})
    finally:
        plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the study report


def _published_timing(folder: Path, runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """``wall_seconds`` / ``run_seconds`` for the report: this command's, except when it ran no fit or test
    (``run_seconds`` 0) and the report published in ``folder`` covers the same runs: then that report's, the
    time the study took (a rerun of a finished study must not report its own seconds as the study's)."""
    own = {key: settings.get(key) for key in ("wall_seconds", "run_seconds")}
    if settings.get("run_seconds") != 0:
        return own
    try:
        previous = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return own
    if not isinstance(previous, dict) or previous.get("runs") != json.loads(json.dumps(runs)):
        return own
    earlier = previous.get("settings") or {}
    if earlier.get("wall_seconds") is None:
        return own
    return {key: earlier.get(key) for key in own}


def _title(settings: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    configs = ", ".join(Path(path).stem for path in settings["fit_config"])
    train = _and(sorted(_train_resolutions(settings["train_resolution"])))
    seeds = len({run["seed"] for run in runs})
    return f"Position encoding study ({configs}): trained at {train}px, {seeds} seed{'s' if seeds > 1 else ''}"


def write_study_report(
    folder: str | os.PathLike, runs: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Path]:
    """Render results.json, results.md and accuracy_vs_resolution.png in memory, then publish them together.

    ``settings``: the study's arguments plus ``train_resolution``, ``wall_seconds`` and ``run_seconds`` (the
    seconds of the fits and tests this command ran; 0 when it reused every run); a rerun that reused every run
    keeps the published report's timings, so rerunning a finished study rewrites the same report.
    """
    folder = Path(folder)
    summary = summarize(runs)
    baseline = settings.get("baseline")
    pairs = comparisons(runs, baseline if any(run["variant"] == baseline for run in runs) else None,
                        variant_references(runs, settings.get("variant_net_args")))
    differences = paired_differences(runs, pairs)
    settings = {**settings, **_published_timing(folder, runs, settings)}
    document = {"settings": settings, "verdict_rule": VERDICT_RULE, "summary": summary,
                "paired_differences": differences, "runs": runs}
    report_id = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:12]
    markdown = study_markdown(summary, runs, settings, differences) + (
        f"\nReport `{report_id}`: results.json (`report_id`), this file and accuracy_vs_resolution.png (its "
        "Description) of one write carry the same id.\n"
    )
    files = {
        "results.json": json.dumps({"report_id": report_id, **document}, indent=2) + "\n",
        "results.md": markdown,
        "accuracy_vs_resolution.png": study_plot(summary, settings["train_resolution"], differences,
                                                 title=_title(settings, runs), report_id=report_id),
    }
    return write_report_files(folder, files)
