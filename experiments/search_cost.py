"""What a `tuner search --model dXX` costs on GPUs: images per trial at each fidelity, GPU-hours.

    python -m experiments.search_cost            # -> experiments/search/cost.md

No GPU was available when this was written, so seconds per image are **FLOP-based**: the
transformer's matmul FLOPs per image (CFG doubles the rows) divided by an assumed sustained rate
(`--tflops`, default 400: ~40% of an H100/H200's dense bf16 peak, what batched inference of a
2B-parameter model reaches), plus the VQ-VAE decode at `--decode-share` of the end-to-end time
(35%, measured on d16 on a CPU: an upper bound for the larger models, whose transformer dominates).
Images per screened trial come from the measured tiny search (experiments/search/efficiency.csv:
the successive-halving share of trials reaching each rung), so the counts are real and only the
seconds are estimated. Replace `--tflops` with a measured `tuner bench --device cuda` rate to update.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("d16", "d20", "d24", "d30")


def flops_per_image(var_cfg) -> float:
    """Matmul FLOPs of one image's generation with CFG (2 rows per image), attention included."""
    c, depth = var_cfg.embed_dim, var_cfg.depth
    lengths = [p * p for p in var_cfg.patch_nums]
    tokens = sum(lengths)
    hidden = 4 * c * c + 2 * int(var_cfg.mlp_ratio * c) * c  # qkv + proj, mlp in and out
    dense = 2 * hidden * depth * tokens
    prefix, attention = 0, 0
    for n in lengths:  # each scale's queries over every earlier key plus its own: QK^T and AV
        prefix += n
        attention += 2 * 2 * n * prefix * c * depth
    head = 2 * c * 4096 * tokens  # the VQ codebook logits
    return 2 * (dense + attention + head)  # two rows per image (classifier-free guidance)


def measured_images(csv_path: Path) -> dict[str, float]:
    """Mean screening images per counted trial and final-round images, per setting, from the tiny run."""
    rows = list(csv.DictReader(open(csv_path)))
    out = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        sel = [r for r in rows if r["setting"] == name]
        trials = sum(int(r["trials"]) - int(r["duplicates"]) for r in sel)
        out[name] = (sum(int(r["screen_images"]) for r in sel) / trials,
                     sum(int(r["final_images"]) for r in sel) / len(sel), trials / len(sel))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU (assumed)")
    ap.add_argument("--decode-share", type=float, default=0.35)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--efficiency", default=str(ROOT / "experiments" / "search" / "efficiency.csv"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "search" / "cost.md"))
    args = ap.parse_args(argv)
    from tuner.model.config import model_config

    images = measured_images(Path(args.efficiency))
    cmd = " ".join(["python -m experiments.search_cost", *(argv or sys.argv[1:])])
    lines = ["# Search cost on GPUs (FLOP-based: no GPU was measured)", "",
             f"Command: `{cmd}`; date {dt.date.today().isoformat()}. "
             f"Seconds per image = transformer FLOPs / {args.tflops:g} TFLOP/s (assumed sustained bf16), "
             f"÷ (1 − {args.decode_share:g}) for the VQ-VAE decode. Images per trial: measured on tiny "
             "(experiments/search/efficiency.csv), per counted trial (duplicates cost nothing).", "",
             "| setting | screening images / trial | final-round images | trials |", "|---|---|---|---|"]
    for name, (per_trial, final, trials) in images.items():
        lines.append(f"| {name} | {per_trial:.1f} | {final:.0f} | {trials:.0f} |")
    lines += ["", f"GPU time of one search with `--trials {args.trials}` (one GPU; N GPUs divide it, "
              "one Ray worker each; model load and the full-cache reference images not included):", "",
              "| model | TFLOP / image | s / image (est.) | " + " | ".join(f"{n} (GPU-min)" for n in images)
              + " |", "|" + "---|" * (3 + len(images))]
    for model in MODELS:
        cfg = model_config(model).var
        flops = flops_per_image(cfg)
        sec = flops / (args.tflops * 1e12) / (1 - args.decode_share)
        cells = [f"{(per_trial * args.trials + final) * sec / 60:.2f}"
                 for per_trial, final, _ in images.values()]
        lines.append(f"| {model} | {flops / 1e12:.2f} | {sec * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
