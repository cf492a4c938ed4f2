"""Train the ``tiny`` model's FID feature network (``tuner.quality.features.FeatureNet``).

A classifier of the procedural classes whose penultimate layer is the FID feature space. A
classifier trained on clean images only was measured to be misleading on tokenizer output
(experiments/tiny/README.md), so training sees degraded images: blur at the tokenizer's ×4 scale,
noise and colour jitter; and, once a tiny VQ-VAE exists, real tokenizer reconstructions
(``--vae``, or any ``--recon-fn module:function`` mapping ``[N,3,32,32]`` in [-1,1] to the same).

    python -m experiments.train_feature_net                                    # shipped weights
    python -m experiments.train_feature_net --vae tuner/assets/tiny/vae_tiny.pth   # with reconstructions
    python -m experiments.train_feature_net --steps 50 --out /tmp/f.pt --report /tmp/f.md   # smoke run

Held-out accuracy (fresh seeds, never used for training) goes to ``--report`` (markdown) and stdout.
"""
from __future__ import annotations

import argparse
import importlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.data.procedural import NUM_CLASSES, make_dataset
from tuner.quality.features import FeatureNet

ROOT = Path(__file__).resolve().parent.parent

Recon = Callable[[torch.Tensor], torch.Tensor]


def blur4(x: torch.Tensor) -> torch.Tensor:
    """What a ×4 tokenizer keeps, roughly: 4×4 average then bilinear back up. ``x``: [N,3,32,32] in [0,1]."""
    return F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (5×5 separable kernel). ``sigma``: [N]."""
    n = x.shape[0]
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 5]
    w = k.repeat_interleave(3, 0)  # one kernel per (image, channel) as a grouped conv
    y = x.reshape(1, n * 3, *x.shape[-2:])
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), w[:, None, None, :], groups=n * 3)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), w[:, None, :, None], groups=n * 3)
    return y.reshape_as(x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random degradations resembling reconstructions and samples. ``x``: [N,3,32,32] in [0,1]."""
    n = x.shape[0]

    def r(*shape):
        return torch.rand(*shape, generator=g)

    # Blur: a third sharp, a third Gaussian, a third partly towards the ×4 block blur.
    kind = torch.randint(0, 3, (n,), generator=g)
    gauss = _gaussian_blur(x, 0.4 + 1.1 * r(n))
    alpha = (0.3 + 0.7 * r(n))[:, None, None, None]
    coarse = alpha * blur4(x) + (1 - alpha) * x
    x = torch.where((kind == 1)[:, None, None, None], gauss, x)
    x = torch.where((kind == 2)[:, None, None, None], coarse, x)
    # Colour jitter and pixel noise.
    x = x * (0.9 + 0.2 * r(n, 1, 1, 1)) + 0.04 * (r(n, 3, 1, 1) - 0.5)
    x = x + 0.06 * r(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def vae_recon(path: Path) -> Recon:
    """Reconstruction function of a tiny VQ-VAE checkpoint (plain state dict)."""
    from tuner.model.config import tiny_config
    from tuner.model.loading import build_models

    _, vae = build_models(tiny_config())
    vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    vae.eval()
    return lambda x: vae.img_to_reconstructed_img(x).clamp(-1, 1)


def import_recon(spec: str) -> Recon:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--recon-fn {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


@torch.no_grad()
def apply_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  batch: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(net: FeatureNet, x01: torch.Tensor, labels: torch.Tensor) -> float:
    pred = apply_batched(lambda b: net.logits(b).argmax(1), x01)
    return float((pred == labels).float().mean())


def train(args, recon: Recon | None) -> tuple[FeatureNet, dict]:
    torch.manual_seed(args.seed)
    images, labels = make_dataset(args.train_images, seed=args.train_seed)
    x01 = (images + 1) / 2
    rec01 = (apply_batched(recon, images) + 1) / 2 if recon is not None else None
    net = FeatureNet(num_classes=NUM_CLASSES, num_features=args.features)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    net.train()
    t0, log = time.time(), []
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps)) * min(1.0, (step + 1) / 30)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        batch = x01[idx]
        if rec01 is not None:  # half of each batch from tokenizer reconstructions
            use_rec = torch.rand(args.batch, generator=g) < 0.5
            batch = torch.where(use_rec[:, None, None, None], rec01[idx], batch)
        loss = F.cross_entropy(net.logits(augment(batch, g)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step == 0:
            log.append((step + 1, loss.item()))
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
    net.eval()
    return net, {"seconds": time.time() - t0, "log": log}


def evaluate(net: FeatureNet, args, recon: Recon | None) -> dict[str, float]:
    images, labels = make_dataset(args.test_images, seed=args.test_seed)
    x01 = (images + 1) / 2
    out = {"real": accuracy(net, x01, labels), "blur4": accuracy(net, blur4(x01), labels),
           "augmented": accuracy(net, augment(x01, torch.Generator().manual_seed(1)), labels)}
    if recon is not None:
        out["reconstructions"] = accuracy(net, (apply_batched(recon, images) + 1) / 2, labels)
    return out


def write_report(path: Path, args, acc: dict[str, float], info: dict, n_params: int, size: int) -> None:
    rows = "\n".join(f"| {k} | {100 * v:.2f} % |" for k, v in acc.items())
    source = args.vae or args.recon_fn or "none (real images with blur/noise/colour augmentation only)"
    path.write_text(f"""# Tiny FID feature network

`tuner.quality.features.FeatureNet`: {n_params:,} parameters, {args.features} features, weights
`{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}` ({size / 1024:.0f} KiB).
Written by `experiments/train_feature_net.py` ({info['seconds']:.0f} s on {args.threads} CPU threads).

- Training: {args.train_images} procedural images (seed {args.train_seed}), {args.steps} steps of batch
  {args.batch}, AdamW lr {args.lr} (cosine); tokenizer reconstructions: {source}.
- Held-out: {args.test_images} images from seed {args.test_seed} (never seen in training); chance is
  {100 / NUM_CLASSES:.0f} %.

| held-out set | accuracy |
|---|---|
{rows}

`blur4` = 4×4 average pooling then bilinear upsampling (what a ×4 tokenizer roughly keeps);
`augmented` = the training degradations (blur, colour jitter, noise) on held-out images.
""")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tuner" / "assets" / "tiny" / "feature_net.pt")
    ap.add_argument("--report", type=Path, default=ROOT / "experiments" / "tiny" / "feature_net.md")
    ap.add_argument("--vae", type=Path, default=None,
                    help="tiny VQ-VAE state dict: also train on its reconstructions")
    ap.add_argument("--recon-fn", default=None,
                    help="module:function mapping [N,3,32,32] in [-1,1] to reconstructions")
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--train-seed", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=4000)
    ap.add_argument("--test-seed", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.vae is not None and args.recon_fn is not None:
        raise SystemExit("give --vae or --recon-fn, not both")
    torch.set_num_threads(args.threads)
    recon = None
    if args.vae is not None:
        recon = vae_recon(args.vae)
    elif args.recon_fn is not None:
        recon = import_recon(args.recon_fn)
    net, info = train(args, recon)
    acc = evaluate(net, args, recon)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(args.out)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in net.parameters())
    write_report(args.report, args, acc, info, n_params, args.out.stat().st_size)
    print("held-out accuracy:", ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))


if __name__ == "__main__":
    main()
