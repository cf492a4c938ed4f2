"""At how many images does a distribution metric mean something? The minimum screening sample count.

    python -m experiments.fidelity                 # tiny -> experiments/search/fidelity.md

Two policies at 15% memory whose quality really differs (sink_window and window, 1,000-image gap in
experiments/tiny/results.md) and the full cache are generated on four disjoint seed sets of 512 images.
For every prefix size N the script reports, per metric, the mean over the seed sets of the
sink_window − window difference, its standard error across the seed sets, and how many seed sets order
the two policies the right way; plus the other-seed floor (the Fréchet distance between the full
cache's images on two seed sets). A metric resolves the two policies at N when all four seed sets
agree on the order and the mean difference exceeds twice its standard error. The smallest such N for
``fid_vs_full`` is the documented minimum (``tuner.quality.metric_info``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from tuner.quality.evaluate import EvalSpec, build_evaluator

ROOT = Path(__file__).resolve().parent.parent
SIZES = (8, 16, 32, 64, 128, 256, 512)
SEED_SETS = (21000, 23000, 25000, 27000)
POLICIES = {"sink_window": ("sink_window", {"sink_scales": 2, "window": 7, "max_tokens": 12}),
            "window": ("window", {"window": 7, "max_tokens": 12})}


def per_image(a: torch.Tensor, b: torch.Tensor, fa: torch.Tensor,
              fb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image paired metrics of images ``a`` vs ``b`` ``[N, 3, H, W]`` and features ``[N, F]``."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return {"psnr": -10 * torch.log10(mse.clamp_min(1e-12)),
            "feat_dist": (fa.double() - fb.double()).pow(2).sum(1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "search" / "fidelity.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tuner.policies.registry import make_policy
    from tuner.quality.metrics import frechet_distance

    t0 = time.time()
    ev = build_evaluator("tiny", backend="torch")
    n_cls = ev.loaded.config.var.num_classes
    imgs, feats = {}, {}
    for s in SEED_SETS:
        spec = EvalSpec.balanced(n_cls, args.samples, seed=s, batch_size=64)
        for name, (family, params) in {"full": ("full", {}), **POLICIES}.items():
            x, _, _ = ev.generate(make_policy(family, params), spec)
            imgs[name, s], feats[name, s] = x, ev.embed(x)
    sizes = [n for n in SIZES if n <= args.samples]
    rows = []
    for n in sizes:
        diffs: dict[str, list[float]] = {"fid_vs_full": [], "psnr": [], "feat_dist": []}
        effects = []
        for s in SEED_SETS:
            fd = {p: frechet_distance(feats[p, s][:n], feats["full", s][:n]) for p in POLICIES}
            pi = {p: per_image(imgs[p, s][:n], imgs["full", s][:n], feats[p, s][:n], feats["full", s][:n])
                  for p in POLICIES}
            # sign convention: positive = sink_window better
            diffs["fid_vs_full"].append(fd["window"] - fd["sink_window"])
            diffs["psnr"].append(float(pi["sink_window"]["psnr"].mean() - pi["window"]["psnr"].mean()))
            diffs["feat_dist"].append(float(pi["window"]["feat_dist"].mean()
                                            - pi["sink_window"]["feat_dist"].mean()))
            effects.append(fd["sink_window"])
        floor = [frechet_distance(feats["full", a][:n], feats["full", b][:n])
                 for a, b in itertools.combinations(SEED_SETS, 2)]
        row = {"N": n, "floor": sum(floor) / len(floor), "fid_sink": sum(effects) / len(effects)}
        for metric, d in diffs.items():
            mean = sum(d) / len(d)
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
            row[metric] = (mean, se, sum(x > 0 for x in d))
        rows.append(row)
        print(row, flush=True)
    resolved = {m: next((r["N"] for r in rows if r[m][2] == len(SEED_SETS) and r[m][0] > 2 * r[m][1]), None)
                for m in ("fid_vs_full", "psnr", "feat_dist")}
    write(Path(args.out), rows, resolved, argv, time.time() - t0, args)
    return 0


def write(path: Path, rows, resolved, argv, wall, args) -> None:
    cmd = "python -m experiments.fidelity " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Minimum sample counts: where a metric separates two policies of equal memory",
        "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
        f"{torch.get_num_threads()} torch thread(s), CPU; date {dt.date.today().isoformat()}; wall time "
        f"{wall / 60:.1f} min. Model tiny; policies at 15% memory: sink_window and window (max_tokens 12), "
        f"{len(SEED_SETS)} disjoint seed sets of {args.samples} images (balanced labels, batches of 64); "
        "each N uses the first N images of every set.",
        "",
        "Each metric column: mean over the seed sets of (sink_window − window), signed so that positive "
        "means sink_window is better (the 1,000-image result), ± its standard error across the seed sets, "
        f"and in brackets how many of the {len(SEED_SETS)} seed sets order the two the right way. "
        "`floor`: mean other-seed Fréchet distance between the full cache's images on two seed sets "
        "(6 pairs); `fid_vs_full (sink_window)`: the policy's own paired distance.",
        "",
        "| N | floor (full vs full, other seeds) | fid_vs_full (sink_window) | Δ fid_vs_full | Δ PSNR (dB) "
        "| Δ feat_dist |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[m][0]:+.3g} ± {r[m][1]:.2g} [{r[m][2]}]" for m in ("fid_vs_full", "psnr", "feat_dist")]
        lines.append(f"| {r['N']} | {r['floor']:.3g} | {r['fid_sink']:.3g} | " + " | ".join(cells) + " |")
    lines += ["", "Smallest N that resolves the pair (all seed sets agree and mean > 2 SE): "
              + ", ".join(f"{m} {n if n is not None else 'not within ' + str(args.samples)}"
                          for m, n in resolved.items()) + "."]
    from experiments.tiny_results import write_keeping_conclusion

    write_keeping_conclusion(path, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
