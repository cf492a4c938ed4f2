"""How different are the heads of a layer? Per-(layer, head) calibration statistics vs their noise floor.

    python -m experiments.head_stats                      # tiny, 64 images -> experiments/heads/
    python -m experiments.head_stats --samples 16 --out /tmp/h          # quick look

Computes :mod:`tuner.calibration_heads`' statistics from full-cache generations of ``--samples``
calibration images and reduces each head to three numbers, each the mean over query scales:

- ``dispersion``: HACK's vertical (1, contextual) vs diagonal (0, structural) pattern, scales >= 2;
- ``history mass``: attention mass on earlier scales, scales >= 1 (the own, newest scale gets 1 - it);
- ``previous-scale share``: the part of the history mass on the previous scale, scales >= 2.

Per layer: min / median / max over heads, coefficient of variation (SD / mean), the between-head SD,
and the noise SD of a head's value, from two disjoint halves of the images (even / odd index):
``noise SD = RMS over the layer's heads of (half A - half B) / 2`` (the full sample has half the
variance of one half, the difference of two halves twice it). A between-head SD well above the noise
SD means heads differ by more than the images' sampling noise. Writes stats.md and stats.png into
``--out``; text in an existing stats.md below the ``CONCLUSION`` marker line is kept.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from experiments.tiny_results import CONCLUSION, write_keeping_conclusion
from tuner.calibration import CalibrationSpec
from tuner.calibration_heads import HeadSpec, compute_head_stats, contextual_split
from tuner.model.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
STATS = ("dispersion", "history mass", "previous-scale share")


def head_values(stats) -> dict[str, torch.Tensor]:
    """Per statistic ``[3, L, H]``: the full sample, then half A and half B."""
    mass = torch.cat((stats.mass[None], stats.mass_halves))  # [3, L, H, S, S]
    history = mass.tril(-1).sum(-1)                           # [3, L, H, S]
    prev = torch.diagonal(mass, offset=-1, dim1=-2, dim2=-1)  # [3, L, H, S-1]: mass[s, s-1]
    share = prev[..., 1:] / history[..., 2:]                  # query scales >= 2
    disp = torch.cat((stats.dispersion[None], stats.dispersion_halves))
    return {"dispersion": disp, "history mass": history[..., 1:].mean(-1),
            "previous-scale share": share.mean(-1)}


def spread(values: torch.Tensor) -> list[dict]:
    """Per layer (and all layers, as the last row) the spread over heads vs the half-split noise."""
    full, a, b = values
    rows = []
    for layer in range(full.shape[0] + 1):
        x = full[layer] if layer < full.shape[0] else full.flatten()
        d = (a[layer] - b[layer]) if layer < full.shape[0] else (a - b).flatten()
        centred = None if layer < full.shape[0] else full - full.mean(1, keepdim=True)
        between = float(centred.pow(2).sum() / (centred.numel() - full.shape[0])) ** 0.5 \
            if centred is not None else float(x.std())
        noise = float(d.pow(2).mean().sqrt()) / 2
        rows.append({"layer": layer if layer < full.shape[0] else "all", "min": float(x.min()),
                     "median": float(x.median()), "max": float(x.max()), "cv": float(x.std() / x.mean()),
                     "between": between, "noise": noise, "ratio": between / noise if noise else float("inf")})
    return rows


def split_half_correlation(values: torch.Tensor) -> float:
    """Pearson r over all heads of half A vs half B after removing each layer's mean: do the
    within-layer differences between heads replicate on other images?"""
    _, a, b = values
    a, b = (t - t.mean(1, keepdim=True) for t in (a, b))
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def markdown(stats, values: dict, args) -> str:
    g = stats.geometry
    ratios = {k: spread(v) for k, v in values.items()}
    same = contextual_split(stats.dispersion_halves[0], stats.spec.contextual_quantile) == \
        contextual_split(stats.dispersion_halves[1], stats.spec.contextual_quantile)
    cmd = "python -m experiments.head_stats " + shlex.join(args.argv)
    lines = [f"# {stats.model_name}: how different are the heads of a layer?", "",
             f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, "
             f"{torch.get_num_threads()} torch threads, device {args.device}; "
             f"date {dt.date.today().isoformat()}; "
             f"wall time {args.seconds:.0f} s. Model {stats.model_name} ({g.num_layers} layers × "
             f"{g.num_heads} heads, patch_nums {list(g.patch_nums)}), checkpoint sha256 "
             f"{(stats.checkpoint_sha256 or 'none')[:16]}…; {args.samples} calibration images (labels spread "
             f"over the classes, batches of {args.batch_size} seeded {args.seed}+j, cfg "
             f"{stats.spec.images.cfg}, top-k {stats.spec.images.top_k}, top-p {stats.spec.images.top_p}), "
             f"halves of {stats.half_images[0]} and {stats.half_images[1]} images (even / odd index). "
             "Statistics: tuner/calibration_heads.py (definitions in its docstring); reduction and noise "
             "estimate: this script's docstring. Figure: stats.png.", "",
             "**Headline.** Between-head SD / half-split noise SD (about 1 if the heads of a layer were "
             "alike), median over layers (all heads, layer means removed): " + "; ".join(
                 f"{k} {_median([r['ratio'] for r in ratios[k][:-1]]):.0f}× ({ratios[k][-1]['ratio']:.0f}×)"
                 for k in STATS) + ". Split-half correlation of the within-layer head differences: "
             + "; ".join(f"{k} r = {split_half_correlation(values[k]):.3f}" for k in STATS)
             + f". Contextual split (dispersion ≥ layer median) identical on both halves for "
             f"{int(same.sum())}/{same.numel()} heads.", ""]
    for k in STATS:
        lines += [f"## {k}", "", "| layer | min | median | max | CV | between-head SD | noise SD | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ratios[k]:
            lines.append(f"| {r['layer']} | {r['min']:.4f} | {r['median']:.4f} | {r['max']:.4f} | "
                         f"{r['cv']:.3f} | {r['between']:.2e} | {r['noise']:.2e} | {r['ratio']:.1f} |")
        lines.append("")
    lines += ["The `all` row: min / median / max / CV over every head; its between-head SD is the pooled "
              "within-layer SD (layer means removed), so layers' differences do not count as heads'.", "",
              "## Per head", "", "| layer | head | " + " | ".join(STATS) + " | contextual |",
              "|---|---|---|---|---|---|"]
    for layer in range(g.num_layers):
        for h in range(g.num_heads):
            vals = " | ".join(f"{float(values[k][0, layer, h]):.4f}" for k in STATS)
            lines.append(f"| {layer} | {h} | {vals} | {'yes' if stats.contextual[layer, h] else 'no'} |")
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median())


def plot(stats, values: dict, path: Path) -> None:
    """Three layers × heads heatmaps (C = contextual) and the last scale's mass per (head, source scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = stats.geometry
    fig = plt.figure(figsize=(17, 4.8))
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.3])
    for i, k in enumerate(STATS):
        ax = fig.add_subplot(grid[0, i])
        v = values[k][0].numpy()
        im = ax.imshow(v, cmap="viridis", aspect="auto")
        for layer in range(g.num_layers):
            for h in range(g.num_heads):
                mark = " C" if (k == "dispersion" and stats.contextual[layer, h]) else ""
                ax.text(h, layer, f"{v[layer, h]:.3f}{mark}", ha="center", va="center", fontsize=7,
                        color="white" if v[layer, h] < (v.min() + v.max()) / 2 else "black")
        ax.set(xlabel="head", ylabel="layer", title=k, xticks=range(g.num_heads), yticks=range(g.num_layers))
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(grid[0, 3])
    last = stats.mass[:, :, -1].reshape(g.num_layers * g.num_heads, g.num_scales).numpy()
    im = ax.imshow(last, cmap="magma", aspect="auto", vmin=0, vmax=1)
    ax.set(xlabel="source scale", ylabel="layer.head", title=f"mass of scale {g.num_scales - 1}'s queries "
           "per source scale (HeatKV)", xticks=range(g.num_scales))
    ax.set_yticks(range(g.num_layers * g.num_heads),
                  [f"{layer}.{h}" for layer in range(g.num_layers) for h in range(g.num_heads)], fontsize=6)
    for layer in range(1, g.num_layers):  # layer boundaries
        ax.axhline(layer * g.num_heads - 0.5, color="white", lw=0.8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="named model (tiny built in; d16..d36 need --weights-dir)")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=64, help="calibration images (two halves for the noise)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "heads")
    args = ap.parse_args(argv)
    if args.samples < 4:
        ap.error("--samples must be >= 4 (two halves of at least two images)")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_model(args.model, weights_dir=args.weights_dir, device=args.device)
    spec = HeadSpec(CalibrationSpec(samples=args.samples, seed=args.seed, batch_size=args.batch_size))
    stats = compute_head_stats(loaded.var, loaded.vae, loaded.config, spec,
                               checkpoint_sha256=loaded.checkpoint_sha256)
    args.seconds = time.time() - t0
    values = head_values(stats)
    args.out.mkdir(parents=True, exist_ok=True)
    write_keeping_conclusion(args.out / "stats.md", markdown(stats, values, args))
    plot(stats, values, args.out / "stats.png")
    print((args.out / "stats.md").read_text().split(CONCLUSION)[0])


if __name__ == "__main__":
    main()
