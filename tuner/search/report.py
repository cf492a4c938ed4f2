"""Search reports: the Pareto front (memory fraction vs quality) as CSV and PNG, and the comparison
table (full cache, paper presets, winner) as CSV, Markdown and a rich table.

The front is computed over evaluated trials that meet the study's constraints, on the two axes
(memory fraction, quality objective) whatever the study's own objectives are, so fronts of different
studies can be compared. Presets are marked.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from tuner.quality.metric_info import MIN_DISTRIBUTION_SAMPLES
from tuner.quality.metric_info import TABLE_COLUMNS as TABLE_METRICS
from tuner.search.objective import Objective, pareto_front
from tuner.search.trials import TrialRecord



def front_records(records: list[TrialRecord], objective: Objective) -> list[TrialRecord]:
    """Evaluated, constraint-satisfying trials not dominated on (memory fraction, quality)."""
    pts = []
    for r in records:
        if r.feasible and "memory_fraction" in r.metrics and objective.metric in r.metrics:
            pts.append((r, [r.metrics["memory_fraction"], objective.quality(r.metrics)]))
    return sorted(pareto_front(pts), key=lambda r: r.metrics["memory_fraction"])


def write_pareto_csv(records: list[TrialRecord], objective: Objective, path: Path) -> Path:
    front = {r.number for r in front_records(records, objective)}
    metric_names = sorted({k for r in records for k in r.metrics})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "state", "family", "preset", "feasible", "plan_infeasible", "pareto",
                    *metric_names, "params"])
        for r in records:
            w.writerow([r.number, r.state, r.family or "", r.preset or "", int(r.feasible),
                        int(r.plan_infeasible),
                        int(r.number in front), *[r.metrics.get(k, "") for k in metric_names],
                        json.dumps(r.params, sort_keys=True)])
    return path


def write_pareto_png(records: list[TrialRecord], objective: Objective, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = objective.metric
    evaluated = [r for r in records if r.evaluated and metric in r.metrics and "memory_fraction" in r.metrics]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for feasible, color, label in ((True, "tab:blue", "feasible"), (False, "tab:orange", "infeasible")):
        pts = [r for r in evaluated if r.feasible == feasible]
        if pts:
            ax.scatter([r.metrics["memory_fraction"] for r in pts], [_y(r.metrics[metric]) for r in pts],
                       s=18, color=color, alpha=0.7, label=label)
    front = front_records(records, objective)
    if front:
        ax.plot([r.metrics["memory_fraction"] for r in front], [_y(r.metrics[metric]) for r in front], "-",
                color="tab:green", lw=1.5, label="pareto front")
    for r in evaluated:
        if r.preset:
            ax.scatter([r.metrics["memory_fraction"]], [_y(r.metrics[metric])], marker="*", s=140,
                       color="tab:red", zorder=5)
            ax.annotate(r.preset, (r.metrics["memory_fraction"], _y(r.metrics[metric])), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    if objective.mem is not None and objective.mem.fraction is not None:
        ax.axvline(objective.mem.fraction, color="gray", ls="--", lw=1, label="memory target")
    if objective.limit is not None:
        ax.axhline(objective.limit, color="gray", ls=":", lw=1, label=f"{metric} limit")
    ax.set_xlabel("KV memory fraction of the full cache")
    ax.set_ylabel(metric + (" (higher is better)" if objective.maximize else " (lower is better)"))
    ax.set_title(title or "memory vs quality")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _y(v: float) -> float:
    return v if math.isfinite(v) else float("nan")


LATENCY_NOTE = ("No latency column: a single timing per policy on a shared machine is warm-up and noise. "
                "Measure speed with `tuner bench --policy FILE` (warm-up and repeats, transformer and decode "
                "apart). psnr_se: standard error of the mean per-image PSNR. fid_vs_full and delta_fid are "
                f"left empty below {MIN_DISTRIBUTION_SAMPLES} images (--final-samples), where they are "
                "noise.")


def comparison_rows(entries: list[tuple[str, str, dict[str, float]]]) -> list[dict[str, Any]]:
    """``[(name, family, metrics)]`` → flat rows with the table metrics (missing ones empty).

    Distribution metrics measured on fewer than their minimum sample count are left empty: below it
    they are bias and noise (experiments/search/fidelity.md), and a table would invite reading them.
    """
    from tuner.quality.metric_info import METRICS

    rows = []
    for name, family, metrics in entries:
        row: dict[str, Any] = {"policy": name, "family": family}
        samples = metrics.get("samples", math.inf)
        row.update({k: None if k in METRICS and samples < METRICS[k].min_samples else metrics.get(k)
                    for k in TABLE_METRICS})
        rows.append(row)
    return rows


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key == "kv_bytes_per_image":
        return f"{v / 2**20:.3f} MiB"
    if key == "memory_fraction":
        return f"{100 * v:.2f}%"
    return f"{v:.4g}"


def write_comparison(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    keys = ["policy", "family", *TABLE_METRICS]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) if k in ("policy", "family") else _fmt(k, row[k])
                                       for k in keys) + " |")
    lines += ["", LATENCY_NOTE]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def comparison_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    from rich.table import Table

    short = {"memory_fraction": "memory", "kv_bytes_per_image": "KV/img", "psnr_se": "± psnr"}
    table = Table(title=title or None)
    for key in ("policy", "family", *TABLE_METRICS):
        table.add_column(short.get(key, key), justify="left" if key in ("policy", "family") else "right")
    for row in rows:
        table.add_row(row["policy"], row["family"], *[_fmt(k, row[k]) for k in TABLE_METRICS])
    return table
