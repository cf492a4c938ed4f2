"""Quantized KV storage searched jointly with eviction, on held-out seeds: does the search beat every
16-bit preset and every "preset + int8 / int4" at equal memory?

    python -m experiments.quant_results                      # tiny, 1000 images -> experiments/quant/
    python -m experiments.quant_results --samples 50 --search-trials 12 --out /tmp/q   # quick look

The protocol of experiments/tiny_results.py (1,000 images per seed set, labels cycling over the
classes, seed sets A = 1000+j, B = 5000+j, C = 9000+j; metrics paired with the full cache on seed
set A; the noise floor is the full cache on B and C), with:

- every baseline / paper family of that table (window, sink_window, ams, scalekv) fitted to 10, 15
  and 25% of the 16-bit cache through its one memory knob, once 16-bit (as published) and once with
  its kept tokens stored int8 and int4 (the knob refitted: a quantized policy keeps more tokens);
- per target, ``tuner search --mem-target T`` (the product command, default space ``all``, which
  searches per-layer-group storage formats jointly with each family's parameters; the budget flags
  are this script's) run into ``--out``/search-T, and its exported policy evaluated on seed set A;
- per row the per-image PSNR's standard error, and for the searched policy the *paired* PSNR
  difference to every other row at its target with its standard error (same images, same seeds).

"Beats" below means: paired PSNR difference > 2 standard errors, and paired fid_vs_full lower by more
than the spread of the noise floor's three other-seed Fréchet distances. Writes results.md, .csv, .png.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.tiny_results import (CONCLUSION, SEEDS_A, SEEDS_B, SEEDS_C, TARGETS, _fmt, class_accuracy,
                                      family_policies, floor_distances, floor_text, noise_floor, seed_sets,
                                      unpaired)
from tuner.quality.evaluate import build_evaluator

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("window", "sink_window", "ams", "scalekv")
FORMATS = ("compute", "int8", "int4")
SEARCHED = "searched (tuner search)"


def fit(ev, name: str, kv_format: str, target: float):
    """``(family, params)`` of baseline/preset ``name`` stored in ``kv_format``, its knob fitted to
    ``target``."""
    from tuner.mem_target import MemTarget
    from tuner.memory import as_geometry, memory_report
    from tuner.policies.fit import fit_to_memory
    from tuner.policies.registry import make_policy

    cfg, limit = ev.loaded.config, MemTarget(fraction=target)
    family, params = family_policies()[name]
    policy = make_policy(family, {**params, "kv_format": kv_format})
    fitted = fit_to_memory(policy, as_geometry(cfg), lambda p: limit.fits(
        memory_report(p, cfg, spec=ev.policy_spec(p)).fraction, 0))
    return None if fitted is None else (family, fitted.params())


def per_image_psnr(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[N]`` PSNR (dB) of each image pair, capped like :func:`tuner.quality.metrics.psnr`."""
    from tuner.quality.metrics import PSNR_CAP_DB

    mse = (images.double() - ref.double()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse.clamp_min(1e-300))).clamp(max=PSNR_CAP_DB)


def run_search(target: float, out: Path, args) -> Path:
    """``tuner search --mem-target T`` into ``out`` (resumed if already there); its exported policy file."""
    pct = f"{round(target * 100):d}%"
    cmd = [sys.executable, "-m", "tuner", "search", "--mem-target", pct, "--out", str(out),
           "--trials", str(args.search_trials), "--samples", str(args.search_samples),
           "--final-samples", str(args.search_final_samples), "--mlflow-uri", "none"]
    print("$", shlex.join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    files = sorted(out.glob("policy_*.json"))
    if not files:
        raise SystemExit(f"the search into {out} exported no policy")
    return files[0]


class Rows:
    """Evaluates policies on seed set A and keeps every row plus its per-image PSNR."""

    def __init__(self, ev, spec, spec_b):
        self.ev, self.spec, self.spec_b = ev, spec, spec_b
        self.rows: list[dict] = []
        self.psnr: dict[int, torch.Tensor] = {}
        self.ref = ev.reference(spec)

    def add(self, policy: str, fmt: str, target: float, family: str, params: dict) -> dict:
        captured = {}
        generate = self.ev.generate

        def capture(p, s, **kw):  # keep the policy's images for the per-image columns
            out = generate(p, s, **kw)
            captured["images"] = out[0]
            return out

        self.ev.generate = capture
        try:
            m = self.ev.evaluate(family, params, self.spec)
        finally:
            self.ev.generate = generate
        images = captured["images"]
        per = per_image_psnr(images, self.ref.images)
        row = {"policy": policy, "format": fmt, "target": target, "family": family, **m,
               "psnr_se": float(per.std() / math.sqrt(len(per))), "params": params,
               "class_acc": class_accuracy(self.ev, images, self.spec.labels),
               **unpaired(self.ev, images, self.spec_b)}
        self.psnr[len(self.rows)] = per
        self.rows.append(row)
        print({k: row.get(k) for k in ("policy", "format", "target", "memory_fraction", "psnr", "psnr_se",
                                       "fid_vs_full")}, flush=True)
        return row

    def paired(self, i: int, j: int) -> tuple[float, float]:
        """Mean and standard error of row ``i``'s per-image PSNR minus row ``j``'s (same images)."""
        d = self.psnr[i] - self.psnr[j]
        return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000, help="images per seed set")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--search-trials", type=int, default=100, help="tuner search --trials")
    ap.add_argument("--search-samples", type=int, default=16, help="tuner search --samples")
    ap.add_argument("--search-final-samples", type=int, default=128, help="tuner search --final-samples")
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "quant")
    args = ap.parse_args(argv)
    args.targets = tuple(float(t) for t in args.targets.split(","))
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    searched = {t: run_search(t, args.out / f"search-{round(t * 100)}", args) for t in args.targets}
    search_minutes = (time.time() - t0) / 60
    ev = build_evaluator("tiny")
    n_cls = ev.loaded.config.var.num_classes
    specs = seed_sets(n_cls, args.samples, args.batch_size)
    floor = noise_floor(ev, *specs)
    rows = Rows(ev, specs[0], specs[1])
    from tuner.policy_file import load_policy_file

    for target in args.targets:
        for name in FAMILIES:
            for fmt in FORMATS:
                found = fit(ev, name, fmt, target)
                if found is not None:
                    rows.add(name if fmt == "compute" else f"{name} + {fmt}", fmt, target, *found)
        policy, _ = load_policy_file(searched[target], ev.loaded.config)
        rows.add(SEARCHED, "searched", target, policy.family, policy.params())
    args.minutes, args.search_minutes = (time.time() - t0) / 60, search_minutes
    write(floor, rows, args)


def verdicts(rows: Rows, floor: list[dict]) -> list[dict]:
    """Per target: the searched row against the best 16-bit row and the best quantized preset row."""
    spread = floor_distances(floor)
    band = (max(spread.values()) - min(spread.values())) if spread else float("nan")
    out = []
    for i, r in enumerate(rows.rows):
        if r["policy"] != SEARCHED:
            continue
        peers = [(j, o) for j, o in enumerate(rows.rows)
                 if o["target"] == r["target"] and o["policy"] != SEARCHED]
        plain = [p for p in peers if p[1]["format"] == "compute"]
        for kind, group in (("best 16-bit preset or baseline", plain),
                            ("best preset + int8/int4", [p for p in peers if p not in plain])):
            if not group:
                continue
            j, best = max(group, key=lambda p: p[1]["psnr"])
            diff, se = rows.paired(i, j)
            dfid = r["fid_vs_full"] - best["fid_vs_full"]
            psnr_call = "beats" if diff > 2 * se else "loses to" if diff < -2 * se else "ties"
            fid_call = "beats" if dfid < -band else "loses to" if dfid > band else "ties"
            out.append({"target": r["target"], "versus": f"{kind}: {best['policy']}", "psnr_diff": diff,
                        "psnr_diff_se": se, "psnr_call": psnr_call, "fid_diff": dfid, "fid_band": band,
                        "fid_call": fid_call, "searched_psnr": r["psnr"], "searched_fid": r["fid_vs_full"]})
    return out


def write(floor: list[dict], rows: Rows, args) -> None:
    keys = ["policy", "format", "target", "family", "memory_fraction", "kv_bytes_per_image", "fid_vs_full",
            "fid_vs_full_unpaired", "delta_fid", "psnr", "psnr_se", "ssim", "class_acc", "params"]
    everything = floor + rows.rows
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in everything:
            w.writerow({k: r.get(k, "") for k in keys})
    cmd = "python -m experiments.quant_results " + shlex.join(args.argv)
    lines = [
        "# tiny: quantized KV storage searched jointly with eviction, on held-out seeds", "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
        f"{torch.get_num_threads()} torch threads, CPU; date {dt.date.today().isoformat()}; wall time "
        f"{args.minutes:.1f} min (of which the searches {args.search_minutes:.1f} min). "
        f"{args.samples} images per seed set (seed set A = {SEEDS_A}+j, B = {SEEDS_B}+j, C = {SEEDS_C}+j; "
        "batches of 50). Memory fraction: KV bytes over the full cache's, both with 16-bit unquantized "
        "elements (docs/design.md, Memory); int8 = 8 bits + one fp16 scale per (token, head) vector, "
        "int4 = 4 bits + fp16 scale and zero point. The searches (`tuner search --mem-target T "
        f"--trials {args.search_trials} --samples {args.search_samples} --final-samples "
        f"{args.search_final_samples}`, default space `all`) screen on their own seeds (0+j, and "
        "1000003+j for their final round): seed sets A/B/C are held out from them. Noise floor: "
        f"{floor_text(floor)}.", "",
        f"## Searched policy vs the best of the rest, per target (paired on the same {args.samples} images)",
        "",
        "| target | versus | searched PSNR | ΔPSNR ± SE | PSNR | searched fid_vs_full | Δfid_vs_full "
        "(floor spread) | fid_vs_full |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts(rows, floor):
        lines.append(f"| {v['target']:.0%} | {v['versus']} | {v['searched_psnr']:.2f} | "
                     f"{v['psnr_diff']:+.2f} ± {v['psnr_diff_se']:.2f} | {v['psnr_call']} | "
                     f"{v['searched_fid']:.3f} | {v['fid_diff']:+.3f} ({v['fid_band']:.3f}) | "
                     f"{v['fid_call']} |")
    lines += ["", "## Every row", "",
              "| policy | target | memory | KV B/img | fid_vs_full (paired) ↓ | fid_vs_full (unpaired) ↓ "
              "| delta_fid ↓ | PSNR (dB) ↑ ± SE | SSIM ↑ | class acc ↑ | parameters |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in everything:
        psnr = _fmt(r.get("psnr"), 2) + (f" ± {r['psnr_se']:.2f}" if "psnr_se" in r else "")
        lines.append(f"| {r['policy']} | {_fmt(r.get('target'), 2)} | {_fmt(r.get('memory_fraction'))} | "
                     f"{_fmt(r.get('kv_bytes_per_image'), 0)} | {_fmt(r.get('fid_vs_full'))} | "
                     f"{_fmt(r.get('fid_vs_full_unpaired'))} | {_fmt(r.get('delta_fid'))} | {psnr} | "
                     f"{_fmt(r.get('ssim'))} | {_fmt(r.get('class_acc'))} | {r.get('params', '')} |")
    md = args.out / "results.md"
    kept = md.read_text().split(CONCLUSION, 1)[1] if md.is_file() and CONCLUSION in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{CONCLUSION}{kept}" if kept else ""))
    plot(floor, rows.rows, args.out / "results.png")
    print(md.read_text())


def plot(floor: list[dict], rows: list[dict], path: Path) -> None:
    """PSNR and paired fid_vs_full vs memory: one line per family and storage format, the searched
    policies as stars, the noise floor's spread as a grey band (fid_vs_full)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"compute": "-", "int8": "--", "int4": ":"}
    colors = dict(zip(FAMILIES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "psnr", "PSNR vs full cache (dB) ↑"),
                           (axes[1], "fid_vs_full", "fid_vs_full (paired) ↓")):
        for name in FAMILIES:
            for fmt in FORMATS:
                pts = sorted((r["memory_fraction"], r[key]) for r in rows
                             if r["format"] == fmt and r["policy"].split(" + ")[0] == name
                             and math.isfinite(r.get(key, math.nan)))
                if pts:
                    ax.plot(*zip(*pts), styles[fmt], marker="o", ms=3, color=colors[name],
                            label=f"{name} ({'16-bit' if fmt == 'compute' else fmt})")
        pts = sorted((r["memory_fraction"], r[key]) for r in rows if r["policy"] == SEARCHED)
        if pts:
            ax.plot(*zip(*pts), "k*-", ms=11, label="searched (joint formats × tokens)")
        dists = list(floor_distances(floor).values())
        if key == "fid_vs_full" and dists:
            ax.axhspan(min(dists), max(dists), color="gray", alpha=0.25, label="noise floor (other seeds)")
        ax.set(xlabel="memory fraction of the full 16-bit KV cache", title=label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    handles2, labels2 = axes[1].get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(handles2, labels2) if lab not in labels]
    fig.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="center left",
               bbox_to_anchor=(0.78, 0.5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
