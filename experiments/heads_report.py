"""Tables and figure of experiments/heads_results.py: results.md, results.csv, results.png."""
from __future__ import annotations

import csv
import datetime as dt
import math
import platform
import shlex
from pathlib import Path

import torch

from experiments.heads_results import FAMILIES, HEAD_FAMILIES, WITH, WITHOUT
from experiments.tiny_results import CONCLUSION, SEEDS_A, SEEDS_B, SEEDS_C, _fmt, floor_distances, floor_text

COLORS = dict(zip(FAMILIES, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))


def call(rows, i: int, j: int, band: float) -> dict:
    """Row ``i`` against row ``j``: paired PSNR difference ± SE and fid_vs_full difference, with verdicts."""
    diff, se = rows.paired(i, j)
    dfid = rows.rows[i]["fid_vs_full"] - rows.rows[j]["fid_vs_full"]
    psnr = "beats" if diff > 2 * se else "loses to" if diff < -2 * se else "ties"
    fid = "beats" if dfid < -band else "loses to" if dfid > band else "ties"
    return {"psnr_diff": diff, "psnr_se": se, "psnr_call": psnr, "fid_diff": dfid, "fid_call": fid}


def verdicts(rows, floor: list[dict]) -> list[dict]:
    """Per target: each head-aware family vs the best other family, and the search with vs without heads."""
    spread = floor_distances(floor)
    band = (max(spread.values()) - min(spread.values())) if spread else float("nan")
    out = []
    for target in sorted({r["target"] for r in rows.rows}):
        idx = {r["policy"]: i for i, r in enumerate(rows.rows) if r["target"] == target}
        others = [n for n in FAMILIES if n not in HEAD_FAMILIES and n in idx]
        if others:
            best = max(others, key=lambda n: rows.rows[idx[n]]["psnr"])
            out += [{"target": target, "row": n, "versus": f"best other family: {best}",
                     **call(rows, idx[n], idx[best], band)} for n in HEAD_FAMILIES if n in idx]
        if WITH in idx and WITHOUT in idx:
            out.append({"target": target, "row": WITH, "versus": WITHOUT,
                        **call(rows, idx[WITH], idx[WITHOUT], band)})
    return out, band


def write(floor: list[dict], rows, args) -> None:
    keys = ["policy", "target", "family", "memory_fraction", "kv_bytes_per_image", "fid_vs_full",
            "fid_vs_full_unpaired", "delta_fid", "psnr", "psnr_se", "ssim", "class_acc", "params"]
    everything = floor + rows.rows
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in everything:
            w.writerow({k: r.get(k, "") for k in keys})
    found, band = verdicts(rows, floor)
    cmd = "python -m experiments.heads_results " + shlex.join(args.argv)
    lines = [
        "# tiny: head-aware budgets (HACK, HeatKV, heads in the search) on held-out seeds", "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
        f"{torch.get_num_threads()} torch threads, CPU; date {dt.date.today().isoformat()}; wall time "
        f"{args.minutes:.1f} min (of which the searches {args.search_minutes:.1f} min). "
        f"{args.samples} images per seed set (seed set A = {SEEDS_A}+j, B = {SEEDS_B}+j, "
        f"C = {SEEDS_C}+j; batches of {args.batch_size}). Memory fraction: KV bytes over the full 16-bit "
        "cache's (docs/design.md, Memory; per-head plans store each layer's heads packed, Σ_h C[l][h]). "
        "Every family is 16-bit here; the searches may also choose int8/int4 storage (their default "
        "space). The searches screen on their own seeds: seed sets A/B/C are held out from them. "
        "Noise floor: "
        f"{floor_text(floor)}; 'beats' in fid_vs_full needs a difference above its spread ({band:.3f}), in "
        "PSNR above 2 paired standard errors. Per-head statistics of this model: stats.md / stats.png.", "",
        f"## Comparisons (paired on the same {args.samples} images)", "",
        "| target | row | versus | ΔPSNR ± SE (dB) | PSNR | Δfid_vs_full | fid_vs_full |",
        "|---|---|---|---|---|---|---|"]
    for v in found:
        lines.append(f"| {v['target']:.0%} | {v['row']} | {v['versus']} | {v['psnr_diff']:+.2f} ± "
                     f"{v['psnr_se']:.2f} | {v['psnr_call']} | {v['fid_diff']:+.3f} | {v['fid_call']} |")
    lines += ["", "## Every row", "",
              "| policy | target | memory | KV B/img | fid_vs_full (paired) ↓ | fid_vs_full (unpaired) ↓ "
              "| PSNR (dB) ↑ ± SE | SSIM ↑ | class acc ↑ | parameters |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in everything:
        psnr = _fmt(r.get("psnr"), 2) + (f" ± {r['psnr_se']:.2f}" if "psnr_se" in r else "")
        params = r.get("params", "")
        if r.get("family"):
            params = f"{r['family']} {params}"
        lines.append(f"| {r['policy']} | {_fmt(r.get('target'), 2)} | {_fmt(r.get('memory_fraction'))} | "
                     f"{_fmt(r.get('kv_bytes_per_image'), 0)} | {_fmt(r.get('fid_vs_full'))} | "
                     f"{_fmt(r.get('fid_vs_full_unpaired'))} | {psnr} | {_fmt(r.get('ssim'))} | "
                     f"{_fmt(r.get('class_acc'))} | {params} |")
    md = args.out / "results.md"
    kept = md.read_text().split(CONCLUSION, 1)[1] if md.is_file() and CONCLUSION in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + CONCLUSION + kept)
    plot(floor, rows.rows, args.out / "results.png")
    print(md.read_text())


def plot(floor: list[dict], rows: list[dict], path: Path) -> None:
    """PSNR and paired fid_vs_full vs memory, one line per family, the two searches as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "psnr", "PSNR vs full cache (dB) ↑"),
                           (axes[1], "fid_vs_full", "fid_vs_full (paired) ↓")):
        for name in FAMILIES:
            pts = sorted((r["memory_fraction"], r[key]) for r in rows
                         if r["policy"] == name and math.isfinite(r.get(key, math.nan)))
            if pts:
                ax.plot(*zip(*pts), "-" if name not in HEAD_FAMILIES else "--", marker="o", ms=3,
                        color=COLORS[name], label=name + (" (per head)" if name in HEAD_FAMILIES else ""))
        for label, marker in ((WITH, "k*"), (WITHOUT, "kx")):
            pts = sorted((r["memory_fraction"], r[key]) for r in rows if r["policy"] == label)
            if pts:
                ax.plot(*zip(*pts), marker + ":", ms=10, label=label)
        dists = list(floor_distances(floor).values())
        if key == "fid_vs_full" and dists:
            ax.axhspan(min(dists), max(dists), color="gray", alpha=0.25, label="noise floor (other seeds)")
        ax.set(xlabel="memory fraction of the full 16-bit KV cache", title=label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.78, 0.5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
