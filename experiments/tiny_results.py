"""Policy results table: every baseline/preset family at ~10/15/25% memory vs the full-cache noise floor.

    python -m experiments.tiny_results                        # tiny, 1000 samples -> experiments/tiny/
    python -m experiments.tiny_results --samples 20 --out /tmp/r          # quick look
    python -m experiments.tiny_results --model d16 --weights-dir W --device cuda \\
        --inception-weights pt_inception-2015-12-05.pth --out experiments/d16   # an ImageNet model

For each family one knob is set to the largest value whose planned memory stays at or below the
target (window/sink_window: token cap; ams: c_min with c_max = 2·c_min; scalekv: budget fraction).
Metrics are paired with the full cache on the same labels and seeds (seed set A): ``fid_vs_full``
(Fréchet distance of feature-net features), PSNR, SSIM; ``fid``/``delta_fid`` against the model's
reference statistics when it has them (tiny: the procedural training distribution); and the feature
net's class accuracy on the policy's images (tiny only). The noise floor is the full cache on two
more seed sets B and C against A (unpaired: same labels, other sampling noise); its three pairwise
Fréchet distances show how much the floor itself moves. Writes results.md,
results.csv and results.png into ``--out``; text in an existing results.md below the ``CONCLUSION``
marker line is kept.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from tuner.memory import memory_report
from tuner.policies.registry import make_policy
from tuner.quality.evaluate import EvalSpec, build_evaluator

ROOT = Path(__file__).resolve().parent.parent

TARGETS = (0.10, 0.15, 0.25)
FAMILIES = ("window", "sink_window", "ams", "scalekv")
SEEDS_A, SEEDS_B, SEEDS_C = 1000, 5000, 9000
METRICS = ("fid_vs_full", "fid_vs_full_unpaired", "delta_fid", "psnr", "ssim", "class_acc")
NOISE = "full cache, seed set {} vs A (noise floor)"
CONCLUSION = "<!-- hand-written conclusion below: kept when the table is regenerated -->"


def family_policies() -> dict:
    """Each family in the shape compared here; :func:`fit` sets its one memory knob."""
    return {
        "window": ("window", {"window": 7, "max_tokens": 1}),
        "sink_window": ("sink_window", {"sink_scales": 2, "window": 7, "max_tokens": 1}),
        "ams": ("ams", {"n_condensed": 2, "window": 1, "window_demanding": 2, "theta_quantile": 0.25,
                        "c_min": 1, "c_max": 2}),
        "scalekv": ("scalekv", {"budget_fraction": 0.5}),
    }


def fit(ev, name: str, target: float):
    """``(family, params, fraction)`` with the family's knob fitted to ``target``
    (tuner.policies.fit), or None.

    The same fitting the search and ``tuner presets --mem-target`` use: the largest knob value whose
    planned memory fraction is <= target (ams keeps c_max = 2·c_min).
    """
    from tuner.mem_target import MemTarget
    from tuner.memory import as_geometry
    from tuner.policies.fit import fit_to_memory

    cfg, limit = ev.loaded.config, MemTarget(fraction=target)

    def fits(policy) -> bool:
        report = memory_report(policy, cfg, spec=ev.policy_spec(policy))
        return limit.fits(report.fraction, report.kv_bytes_per_image)

    family, params = family_policies()[name]
    fitted = fit_to_memory(make_policy(family, params), as_geometry(cfg), fits)
    if fitted is None:
        return None
    fraction = memory_report(fitted, cfg, spec=ev.policy_spec(fitted)).fraction
    return family, {k: getattr(fitted, k) for k in params}, fraction


def class_accuracy(ev, images: torch.Tensor, labels) -> float:
    """Fraction of images the feature net assigns their conditioning label (nan without a classifier)."""
    logits = getattr(ev.features, "logits", None)
    if logits is None:
        return float("nan")
    with torch.no_grad():
        pred = torch.cat([logits(b).argmax(1) for b in torch.split(images, 256)])
    return float((pred == torch.tensor(labels)).float().mean())


def unpaired(ev, images: torch.Tensor, spec_b: EvalSpec) -> dict:
    """``fid_vs_full_unpaired``: policy images (seed set A) vs full-cache images of seed set B.

    Comparable with the noise floor's Fréchet distance, which is unpaired too (full A vs full B).
    """
    from tuner.quality.metrics import frechet_distance

    ref_b = ev.reference(spec_b)
    if ref_b.features is None:
        return {}
    return {"fid_vs_full_unpaired": frechet_distance(ev.embed(images), ref_b.features)}


def noise_floor(ev, spec_a: EvalSpec, spec_b: EvalSpec, spec_c: EvalSpec) -> list[dict]:
    """Two noise-floor rows: the full cache on seed sets B and C, each scored against seed set A as if it
    were a policy. Paired columns are vs full A; the unpaired column is vs full B like every policy row
    (so for B itself it is FD(B, A)). Three independent seed sets give three other-seed Fréchet
    distances, FD(A,B), FD(A,C), FD(B,C): the spread of the floor, not just one draw of it.
    """
    from tuner.quality.metrics import FeatureStats, fid_from_stats, frechet_distance, psnr, ssim

    a, b, c = (ev.reference(s) for s in (spec_a, spec_b, spec_c))
    fid = {}
    if ev.reference_stats is not None and a.features is not None:
        fid = {k: fid_from_stats(FeatureStats.from_features(r.features), ev.reference_stats)
               for k, r in (("A", a), ("B", b), ("C", c))}
    acc_a = class_accuracy(ev, a.images, spec_a.labels)
    rows = []
    for name, other, spec, vs_b in (("B", b, spec_b, a), ("C", c, spec_c, c)):
        row = {"policy": NOISE.format(name), "target": "", "memory_fraction": 1.0,
               "psnr": psnr(other.images, a.images), "ssim": ssim(other.images, a.images),
               "class_acc": class_accuracy(ev, other.images, spec.labels),
               "class_acc_full_a": acc_a,
               "latency_s_per_image": other.seconds_per_image, "params": ""}
        if a.features is not None:
            row["fid_vs_full"] = frechet_distance(other.features, a.features)
            row["fid_vs_full_unpaired"] = frechet_distance(vs_b.features, b.features)
        if fid:
            row.update(fid=fid[name], fid_full_a=fid["A"], delta_fid=fid[name] - fid["A"])
        rows.append(row)
    return rows


def write_keeping_conclusion(path: Path, text: str) -> None:
    """Write a regenerated table to ``path``, keeping the hand-written text below the CONCLUSION marker."""
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(CONCLUSION):] if CONCLUSION in old else CONCLUSION + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n\n" + kept)


def seed_sets(num_classes: int, samples: int, batch_size: int) -> tuple[EvalSpec, EvalSpec, EvalSpec]:
    """Seed sets A, B and C: the same balanced labels, batch ``j`` seeded ``SEEDS_X + j``."""
    return tuple(EvalSpec.balanced(num_classes, samples, seed=s, batch_size=batch_size)
                 for s in (SEEDS_A, SEEDS_B, SEEDS_C))


def floor_distances(rows: list[dict]) -> dict[str, float]:
    """The other-seed Fréchet distances between full-cache sets: {"A-B": .., "A-C": .., "B-C": ..}."""
    b, c = (r for r in rows if r["policy"].startswith("full cache"))
    if not isinstance(b.get("fid_vs_full"), float):
        return {}
    return {"A-B": b["fid_vs_full"], "A-C": c["fid_vs_full"], "B-C": c["fid_vs_full_unpaired"]}


def floor_text(rows: list[dict]) -> str:
    d = floor_distances(rows)
    return ", ".join(f"FD({k}) = {v:.3f}" for k, v in d.items()) if d else "not available (no features)"


def floor_range(rows: list[dict], key: str) -> tuple[float, float] | None:
    """(min, max) of ``key`` over the noise-floor rows, or None when they lack it."""
    vals = [r[key] for r in rows if r["policy"].startswith("full cache") and isinstance(r.get(key), float)]
    vals += [0.0] if key == "delta_fid" and vals else []  # A's own delta is 0 by definition
    return (min(vals), max(vals)) if vals else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="named model (tiny built in; d16..d36 need --weights-dir)")
    ap.add_argument("--weights-dir", default=None, help="directory with var_<model>.pth and the VQ-VAE")
    ap.add_argument("--inception-weights", default=None, help="FID Inception weights (ImageNet models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=1000,
                    help="images per seed set (balanced over classes); below ~1000 the Fréchet bias of two "
                         "finite sets hides the policies' differences on tiny")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default experiments/<model>)")
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error("--samples must be >= 2 (Fréchet distance needs two images)")
    args.out = args.out or ROOT / "experiments" / args.model
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ev = build_evaluator(args.model, weights_dir=args.weights_dir, device=args.device,
                         inception_weights=args.inception_weights)
    n_cls = ev.loaded.config.var.num_classes
    spec, spec_b, spec_c = seed_sets(n_cls, args.samples, args.batch_size)
    rows = noise_floor(ev, spec, spec_b, spec_c)
    for r in rows:
        print(r, flush=True)
    captured = {}
    generate = ev.generate

    def capture(policy, s, **kw):  # keep the policy images for the class-accuracy column
        out = generate(policy, s, **kw)
        captured["images"] = out[0]
        return out

    ev.generate = capture
    for target in TARGETS:
        for name in FAMILIES:
            found = fit(ev, name, target)
            if found is None:
                rows.append({"policy": name, "target": target, "memory_fraction": float("nan"),
                             "params": "infeasible"})
                continue
            family, params, _ = found
            m = ev.evaluate(family, params, spec)
            rows.append({"policy": name, "target": target, **m, "params": params,
                         "class_acc": class_accuracy(ev, captured["images"], spec.labels),
                         **unpaired(ev, captured["images"], spec_b)})
            print({k: rows[-1].get(k) for k in ("policy", "target", "memory_fraction", *METRICS)}, flush=True)
    args.minutes = (time.time() - t0) / 60
    write(rows, args, ev)


def _fmt(v, d=3) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{d}f}"
    return str(v)


def write(rows: list[dict], args, ev) -> None:
    """results.csv, results.md (table + provenance) and results.png."""
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ["policy", "target", "memory_fraction", "kv_bytes_per_image", *METRICS, "fid",
            "latency_s_per_image", "params"]
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    cmd = "python -m experiments.tiny_results " + shlex.join(args.argv)
    lines = [f"# {ev.loaded.config.name}: policies at ~10/15/25% memory vs the full cache", "",
             f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
             f"{torch.get_num_threads()} torch threads, device {args.device}; "
             f"date {dt.date.today().isoformat()}; wall time {args.minutes:.1f} min. "
             f"{args.samples} images per seed set (labels cycling over the classes, batches of "
             f"{args.batch_size}, seed set A = {SEEDS_A}+j, B = {SEEDS_B}+j, C = {SEEDS_C}+j). Memory "
             "fraction = planned KV bytes / full-cache KV bytes (docs/design.md, Memory, workspace "
             "included). Paired metrics compare each policy with the full cache on seed set A; the unpaired "
             "column compares the policy's images (seeds A) with the full cache on seed set B. The "
             "noise-floor rows score the full cache on seed sets B and C as if they were "
             "policies; the three other-seed Fréchet distances (the floor's spread) are "
             f"{floor_text(rows)} (full-cache class accuracy on A: {_fmt(rows[0].get('class_acc_full_a'))}; "
             f"fid of full A vs the reference set: {_fmt(rows[0].get('fid_full_a'), 2)}).", "",
             "| policy | target | memory | KV B/img | fid_vs_full (paired) ↓ "
             "| fid_vs_full (unpaired, vs B) ↓ "
             "| delta_fid ↓ | PSNR (dB) ↑ | SSIM ↑ | class acc ↑ | s/img | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {_fmt(r.get('target'), 2)} | {_fmt(r.get('memory_fraction'))} | "
                     f"{_fmt(r.get('kv_bytes_per_image'), 0)} | {_fmt(r.get('fid_vs_full'))} | "
                     f"{_fmt(r.get('fid_vs_full_unpaired'))} | "
                     f"{_fmt(r.get('delta_fid'))} | {_fmt(r.get('psnr'), 2)} | {_fmt(r.get('ssim'))} | "
                     f"{_fmt(r.get('class_acc'))} | {_fmt(r.get('latency_s_per_image'))} | "
                     f"{r.get('params', '')} |")
    md = args.out / "results.md"
    kept = md.read_text().split(CONCLUSION, 1)[1] if md.is_file() and CONCLUSION in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{CONCLUSION}{kept}" if kept else ""))
    plot(rows, args.out / "results.png")
    print((args.out / "results.md").read_text())


def plot(rows: list[dict], path: Path) -> None:
    """One panel per metric: quality vs memory fraction per family, the noise floor's spread as a grey
    band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fid_vs_full", "fid_vs_full (paired) ↓", True),
              ("fid_vs_full_unpaired", "fid_vs_full (unpaired, vs seed set B) ↓", False),
              ("delta_fid", "delta_fid ↓", False),
              ("psnr", "PSNR vs full cache (dB) ↑", False), ("ssim", "SSIM vs full cache ↑", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8))
    dists = list(floor_distances(rows).values())
    fid_band = (min(dists), max(dists)) if dists else None
    for ax, (key, label, log) in zip(axes, panels):
        for name in FAMILIES:
            pts = sorted((r["memory_fraction"], r[key]) for r in rows
                         if r["policy"] == name and isinstance(r.get(key), float) and math.isfinite(r[key]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        band = fid_band if key.startswith("fid_vs_full") else floor_range(rows, key)
        if band is not None and all(math.isfinite(v) for v in band):
            ax.axhspan(band[0], band[1], color="gray", alpha=0.25,
                       label="noise floor: full cache, other seed sets (min-max of 3)")
            ax.axhline(band[1], color="gray", ls="--", lw=0.8)
        ax.set(xlabel="memory fraction of the full KV cache", title=label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend below the panels, clear of the data
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
