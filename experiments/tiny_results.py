"""Policy results table: every baseline/preset family at ~10/15/25% memory vs the full-cache noise floor.

    python experiments/tiny_results.py                       # tiny, 200 samples -> experiments/tiny/
    python experiments/tiny_results.py --samples 20 --out /tmp/r          # quick look
    python experiments/tiny_results.py --model d16 --weights-dir W --device cuda \\
        --inception-weights pt_inception-2015-12-05.pth --out experiments/d16   # an ImageNet model

For each family one knob is set to the largest value whose planned memory stays at or below the
target (window/sink_window: token cap; ams: c_min with c_max = 2·c_min; scalekv: budget fraction).
Metrics are paired with the full cache on the same labels and seeds (seed set A): ``fid_vs_full``
(Fréchet distance of feature-net features), PSNR, SSIM; ``fid``/``delta_fid`` against the model's
reference statistics when it has them (tiny: the procedural training distribution); and the feature
net's class accuracy on the policy's images (tiny only). The noise floor is the full cache on a
second seed set B against A (unpaired: same labels, other sampling noise). Writes results.md,
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuner.memory import memory_report  # noqa: E402
from tuner.policies.registry import make_policy  # noqa: E402
from tuner.quality.evaluate import EvalSpec, build_evaluator  # noqa: E402

TARGETS = (0.10, 0.15, 0.25)
FAMILIES = ("window", "sink_window", "ams", "scalekv")
SEEDS_A, SEEDS_B = 1000, 5000
METRICS = ("fid_vs_full", "fid_vs_full_unpaired", "delta_fid", "psnr", "ssim", "class_acc")
NOISE = "full cache, seed set B vs A (noise floor)"
CONCLUSION = "<!-- hand-written conclusion below: kept when the table is regenerated -->"


def knob_policies(c: int, frac: float) -> dict:
    """Each family with its one memory knob set: token cap ``c`` or budget fraction ``frac``."""
    return {
        "window": ("window", {"window": 7, "max_tokens": c}),
        "sink_window": ("sink_window", {"sink_scales": 2, "window": 7, "max_tokens": c}),
        "ams": ("ams", {"n_condensed": 2, "window": 1, "window_demanding": 2, "theta_quantile": 0.25,
                        "c_min": c, "c_max": 2 * c}),
        "scalekv": ("scalekv", {"budget_fraction": frac}),
    }


def fit(ev, name: str, target: float):
    """``(family, params, fraction)`` with the largest knob whose memory fraction is <= target, or None."""
    best = None
    max_tokens = sum(p * p for p in ev.loaded.config.var.patch_nums)
    candidates = [(0, f / 200) for f in range(1, 200)] if name == "scalekv" else [(c, 0.0) for c in range(1, max_tokens)]
    for c, f in candidates:
        family, params = knob_policies(c, f)[name]
        try:
            pol = make_policy(family, params)
            frac = memory_report(pol, ev.loaded.config, spec=ev.policy_spec(pol)).fraction
        except ValueError:
            continue
        if frac <= target + 1e-9 and (best is None or frac >= best[2]):
            best = (family, params, frac)
    return best


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


def noise_floor(ev, spec_a: EvalSpec, spec_b: EvalSpec) -> dict:
    """The full cache on seed set B scored against seed set A, as if B were a policy."""
    from tuner.quality.metrics import FeatureStats, fid_from_stats, frechet_distance, psnr, ssim

    a, b = ev.reference(spec_a), ev.reference(spec_b)
    row = {"policy": NOISE, "target": "", "memory_fraction": 1.0, "psnr": psnr(b.images, a.images),
           "ssim": ssim(b.images, a.images), "class_acc": class_accuracy(ev, b.images, spec_b.labels),
           "class_acc_full_a": class_accuracy(ev, a.images, spec_a.labels),
           "latency_s_per_image": b.seconds_per_image, "params": ""}
    if a.features is not None:
        row["fid_vs_full"] = row["fid_vs_full_unpaired"] = frechet_distance(b.features, a.features)
        if ev.reference_stats is not None:
            fid_a = fid_from_stats(FeatureStats.from_features(a.features), ev.reference_stats)
            fid_b = fid_from_stats(FeatureStats.from_features(b.features), ev.reference_stats)
            row.update(fid=fid_b, fid_full_a=fid_a, delta_fid=fid_b - fid_a)
    return row


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="named model (tiny built in; d16..d36 need --weights-dir)")
    ap.add_argument("--weights-dir", default=None, help="directory with var_<model>.pth and the VQ-VAE")
    ap.add_argument("--inception-weights", default=None, help="FID Inception weights (ImageNet models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=200, help="images per seed set (balanced over classes)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default experiments/<model>)")
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error("--samples must be >= 2 (Fréchet distance needs two images)")
    args.out = args.out or ROOT / "experiments" / args.model
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ev = build_evaluator(args.model, weights_dir=args.weights_dir, device=args.device,
                         inception_weights=args.inception_weights)
    n_cls = ev.loaded.config.var.num_classes
    spec = EvalSpec.balanced(n_cls, args.samples, seed=SEEDS_A, batch_size=args.batch_size)
    spec_b = EvalSpec.balanced(n_cls, args.samples, seed=SEEDS_B, batch_size=args.batch_size)
    rows = [noise_floor(ev, spec, spec_b)]
    print(rows[-1], flush=True)
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
                rows.append({"policy": name, "target": target, "memory_fraction": float("nan"), "params": "infeasible"})
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
    keys = ["policy", "target", "memory_fraction", "kv_bytes_per_image", *METRICS, "fid", "latency_s_per_image",
            "params"]
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    cmd = "python experiments/tiny_results.py " + shlex.join(sys.argv[1:])
    lines = [f"# {ev.loaded.config.name}: policies at ~10/15/25% memory vs the full cache", "",
             f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
             f"{torch.get_num_threads()} torch threads, device {args.device} (CPU shared with other jobs); "
             f"date {dt.date.today().isoformat()}; wall time {args.minutes:.1f} min. "
             f"{args.samples} images per seed set (labels cycling over the classes, batches of {args.batch_size}, "
             f"seed set A = {SEEDS_A}+j, B = {SEEDS_B}+j). Memory fraction = planned KV bytes / full-cache KV "
             "bytes (design §4, workspace included). Paired metrics compare each policy with the full cache on "
             "seed set A; the noise-floor row compares the full cache on seed set B with seed set A "
             f"(full-cache class accuracy on A: {_fmt(rows[0].get('class_acc_full_a'))}; "
             f"fid of full A vs the reference set: {_fmt(rows[0].get('fid_full_a'), 2)}).", "",
             "| policy | target | memory | KV B/img | fid_vs_full (paired) ↓ | fid_vs_full (unpaired, vs B) ↓ "
             "| delta_fid ↓ | PSNR (dB) ↑ | SSIM ↑ | class acc ↑ | s/img | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {_fmt(r.get('target'), 2)} | {_fmt(r.get('memory_fraction'))} | "
                     f"{_fmt(r.get('kv_bytes_per_image'), 0)} | {_fmt(r.get('fid_vs_full'))} | "
                     f"{_fmt(r.get('fid_vs_full_unpaired'))} | "
                     f"{_fmt(r.get('delta_fid'))} | {_fmt(r.get('psnr'), 2)} | {_fmt(r.get('ssim'))} | "
                     f"{_fmt(r.get('class_acc'))} | {_fmt(r.get('latency_s_per_image'))} | {r.get('params', '')} |")
    md = args.out / "results.md"
    kept = md.read_text().split(CONCLUSION, 1)[1] if md.is_file() and CONCLUSION in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{CONCLUSION}{kept}" if kept else ""))
    plot(rows, args.out / "results.png")
    print((args.out / "results.md").read_text())


def plot(rows: list[dict], path: Path) -> None:
    """One panel per metric: quality vs memory fraction per family, the noise floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = rows[0]
    panels = [("fid_vs_full", "fid_vs_full (paired) ↓", True),
              ("fid_vs_full_unpaired", "fid_vs_full (unpaired, vs seed set B) ↓", False),
              ("delta_fid", "delta_fid ↓", False),
              ("psnr", "PSNR vs full cache (dB) ↑", False), ("ssim", "SSIM vs full cache ↑", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8))
    for ax, (key, label, log) in zip(axes, panels):
        for name in FAMILIES:
            pts = sorted((r["memory_fraction"], r[key]) for r in rows[1:]
                         if r["policy"] == name and isinstance(r.get(key), float) and math.isfinite(r[key]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        if isinstance(floor.get(key), float) and math.isfinite(floor[key]):
            ax.axhline(floor[key], color="gray", ls="--", label="noise floor (full, seed set B vs A)")
            if key == "delta_fid":
                ax.axhspan(-abs(floor[key]), abs(floor[key]), color="gray", alpha=0.15)
        ax.set(xlabel="memory fraction of the full KV cache", title=label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
