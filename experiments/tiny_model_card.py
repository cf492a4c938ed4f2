"""Figures and numbers for the tiny model card (experiments/tiny/README.md).

    python experiments/tiny_model_card.py [--workdir experiments/tiny/work]

Writes experiments/tiny/losses.png, samples_per_class.png (one row per class), reconstructions.png
and card_numbers.json (reconstruction PSNR on held-out images, codebook usage, training time).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuner.data.procedural import make_dataset  # noqa: E402
from tuner.images import make_grid, save_png  # noqa: E402
from tuner.model.generate import generate  # noqa: E402
from tuner.model.loading import load_model  # noqa: E402

OUT = ROOT / "experiments" / "tiny"


def plot_losses(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    vae = [r for r in log if r["stage"] == "vae"]
    var = [r for r in log if r["stage"] == "var"]
    if vae:
        axes[0].plot([r["step"] for r in vae], [r["rec"] for r in vae], label="reconstruction (MSE + L1/2)")
        axes[0].plot([r["step"] for r in vae], [r["vq"] for r in vae], label="VQ commitment")
        axes[0].set_yscale("log")
        axes[0].set_title("VQ-VAE")
        axes[0].set_xlabel("step")
        axes[0].legend()
    if var:
        axes[1].plot([r["step"] for r in var], [r["ce"] for r in var])
        axes[1].set_title("VAR: teacher-forced cross-entropy")
        axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=OUT / "work")
    ap.add_argument("--per-class", type=int, default=8)
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    numbers: dict = {}
    log_path = args.workdir / "log.json"
    if log_path.is_file():
        plot_losses(json.loads(log_path.read_text()), OUT / "losses.png")
    if (args.workdir / "summary.json").is_file():
        numbers["training"] = json.loads((args.workdir / "summary.json").read_text())
    loaded = load_model("tiny")
    n_cls = loaded.config.var.num_classes
    # Reconstruction quality on held-out images (a seed never used for training).
    images, labels = make_dataset(512, seed=12345)
    idx = loaded.vae.img_to_idxBl(images)
    rec = loaded.vae.idxBl_to_img(idx).clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).flatten(1).mean(1)
    numbers["recon_psnr_db"] = float((10 * torch.log10(1 / mse)).mean())
    numbers["codes_used_of"] = [int(torch.cat([i.flatten() for i in idx]).unique().numel()), loaded.config.vae.vocab_size]
    save_png(make_grid(torch.cat([(images[:8] + 1) / 2, (rec[:8] + 1) / 2]), nrow=8), OUT / "reconstructions.png", 4)
    # One row of samples per class.
    labels = torch.arange(n_cls).repeat_interleave(args.per_class)
    res = generate(loaded.var, loaded.vae, labels, seed=0, cfg=1.5, top_k=900, top_p=0.96)
    save_png(make_grid(res.images, nrow=args.per_class), OUT / "samples_per_class.png", 3)
    (OUT / "card_numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
