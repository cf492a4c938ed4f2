"""Figures and numbers for the tiny model card (experiments/tiny/README.md), from the shipped weights.

    python -m experiments.tiny_model_card [--log experiments/tiny/training_log.json] [--per-class 8]
                                         [--classify 200] [--out experiments/tiny]

No training: loads ``tuner/assets/tiny`` (the final weights) and the loss log written by
``experiments/train_tiny.py``. Writes into ``--out``:

- ``losses.png``: VQ-VAE reconstruction/commitment losses and codebook usage, VAR teacher-forced CE;
- ``reconstructions.png``: held-out images (top row) over their tokenizer reconstructions (bottom);
- ``samples_per_class.png``: one row per class (class 0 at the top), ``--per-class`` samples each,
  full cache, the CLI's default sampling (cfg 1.5, top-k 900, top-p 0.96), seed 0, upscaled ×4 with
  nearest-neighbour so 32 px images stay sharp;
- ``card_numbers.json``: reconstruction PSNR on held-out images, codebook usage, the shipped
  feature net's accuracy on real / reconstructed / generated images per class (the fraction of
  class-``c`` images it labels ``c``), sampling time per image, and the training-log summary.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tuner.data.procedural import CLASS_NAMES, make_dataset
from tuner.images import make_grid, save_png
from tuner.model.generate import generate
from tuner.model.loading import load_model
from tuner.quality.features import load_feature_net

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "experiments" / "tiny"
HELDOUT_SEED = 12345  # never used for training (train_tiny.py uses seed 0)


def plot_losses(log: list[dict], path: Path) -> None:
    """Three panels: VQ-VAE losses (log scale), codebook usage per batch, VAR cross-entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vae = [r for r in log if r["stage"] == "vae"]
    var = [r for r in log if r["stage"] == "var"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in vae]
    axes[0].plot(steps, [r["rec"] for r in vae], label="reconstruction (MSE + ½·L1)")
    axes[0].plot(steps, [r["vq"] for r in vae], label="VQ commitment")
    axes[0].set(yscale="log", title="VQ-VAE losses (train batch)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["usage"] for r in vae])
    axes[1].set(title="VQ-VAE: fraction of the 512 codes used per batch", xlabel="step", ylim=(0, 1))
    axes[2].plot([r["step"] for r in var], [r["ce"] for r in var])
    axes[2].set(title="VAR: teacher-forced cross-entropy (nats)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_summary(log: list[dict]) -> dict:
    """Final and first logged values of each stage (train batches, every 10 steps)."""
    vae = [r for r in log if r["stage"] == "vae"]
    var = [r for r in log if r["stage"] == "var"]
    return {"vae_steps": vae[-1]["step"] if vae else 0, "vae_rec_last": vae[-1]["rec"] if vae else None,
            "vae_usage_last": vae[-1]["usage"] if vae else None,
            "var_steps": var[-1]["step"] if var else 0, "var_ce_first": var[0]["ce"] if var else None,
            "var_ce_last": var[-1]["ce"] if var else None,
            "var_ce_last_100_mean": sum(r["ce"] for r in var[-10:]) / max(1, len(var[-10:]))}


def per_class_accuracy(net, images01: torch.Tensor, labels: torch.Tensor, n_cls: int) -> dict:
    """Fraction of class-``c`` images the feature net labels ``c``, per class and overall."""
    with torch.no_grad():
        pred = torch.cat([net.logits(b).argmax(1) for b in torch.split(images01, 256)])
    ok = pred == labels
    per = [float(ok[labels == c].float().mean()) for c in range(n_cls)]
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return {"overall": float(ok.float().mean()), "per_class": per, "confusion": confusion.tolist()}


def generate_balanced(loaded, per_class: int, seed: int,
                      batch: int = 50) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``per_class`` full-cache samples of every class (class-major order) and seconds per image."""
    n_cls = loaded.config.var.num_classes
    labels = torch.arange(n_cls).repeat_interleave(per_class)
    images, t0 = [], time.perf_counter()
    for j, chunk in enumerate(torch.split(labels, batch)):
        images.append(generate(loaded.var, loaded.vae, chunk, seed=seed + j, cfg=1.5, top_k=900,
                               top_p=0.96).images)
    return torch.cat(images), labels, (time.perf_counter() - t0) / len(labels)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, default=OUT / "training_log.json", help="loss log from train_tiny.py")
    ap.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    ap.add_argument("--classify", type=int, default=200, help="generated samples classified (balanced)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"machine": f"{platform.machine()} CPU, {args.threads} threads, "
                                f"torch {torch.__version__}"}
    if args.log.is_file():
        log = json.loads(args.log.read_text())
        plot_losses(log, args.out / "losses.png")
        numbers["training_log"] = log_summary(log)
    loaded = load_model("tiny")
    net = load_feature_net().eval()
    n_cls = loaded.config.var.num_classes
    numbers["params"] = {"var": sum(p.numel() for p in loaded.var.parameters()),
                         "vae": sum(p.numel() for p in loaded.vae.parameters())}

    # Tokenizer on held-out images.
    images, labels = make_dataset(1000, seed=HELDOUT_SEED)
    idx = [torch.cat(p) for p in zip(*(loaded.vae.img_to_idxBl(b) for b in torch.split(images, 250)))]
    rec = torch.cat([loaded.vae.idxBl_to_img([i[k:k + 250] for i in idx])
                     for k in range(0, len(images), 250)])
    rec = rec.clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse)
    numbers["recon_psnr_db"] = {"mean": float(psnr.mean()),
                                "per_class": [float(psnr[labels == c].mean()) for c in range(n_cls)]}
    numbers["codes_used_of"] = [int(torch.cat([i.flatten() for i in idx]).unique().numel()),
                                loaded.config.vae.vocab_size]
    first = torch.stack([int((labels == c).nonzero()[0]) * torch.ones((), dtype=torch.long)
                         for c in range(n_cls)])
    save_png(make_grid(torch.cat([(images[first] + 1) / 2, (rec[first] + 1) / 2]), nrow=n_cls),
             args.out / "reconstructions.png", 4)
    numbers["feature_net_accuracy_real"] = per_class_accuracy(net, (images + 1) / 2, labels, n_cls)
    numbers["feature_net_accuracy_reconstructions"] = per_class_accuracy(net, (rec + 1) / 2, labels, n_cls)

    # Per-class sample grid (seed 0) and the classification sanity check on other seeds.
    grid, _, _ = generate_balanced(loaded, args.per_class, seed=0)
    save_png(make_grid(grid, nrow=args.per_class), args.out / "samples_per_class.png", 4)
    per = max(1, args.classify // n_cls)
    gen, gen_labels, sec = generate_balanced(loaded, per, seed=100)
    numbers["sample_seconds_per_image"] = sec
    numbers["feature_net_accuracy_generated"] = {"samples": len(gen_labels), "seed": 100,
                                                 **per_class_accuracy(net, gen, gen_labels, n_cls)}
    numbers["class_names"] = list(CLASS_NAMES)
    (args.out / "card_numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps({k: v for k, v in numbers.items() if k != "class_names"}, indent=1))


if __name__ == "__main__":
    main()
