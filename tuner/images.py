"""Writing images: per-image PNGs, sample grids and the ``samples.npz`` bundle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] → ``[B, H, W, 3]`` uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path, upscale: int = 1) -> None:
    """Save one ``[3, H, W]`` image in [0, 1] as PNG (nearest-neighbour ``upscale`` for tiny images)."""
    from PIL import Image

    arr = to_uint8(image[None])[0]
    img = Image.fromarray(arr)
    if upscale > 1:
        img = img.resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST)
    img.save(path)


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Tile ``[B, 3, H, W]`` into one ``[3, H', W']`` image with white padding."""
    b, c, h, w = images.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_samples(out_dir: Path, images: torch.Tensor, labels: torch.Tensor, upscale: int = 1,
                 condition: str = "class") -> list[Path]:
    """Write ``samples.npz`` (images float32 [B,3,H,W] in [0,1], labels int64 [B]) and one PNG each,
    named ``<i>_<condition><label>.png`` (``condition``: ``class``, or ``prompt`` for a prompt index)."""
    np.savez(out_dir / "samples.npz", images=images.detach().float().cpu().numpy().astype(np.float32),
             labels=labels.detach().cpu().numpy().astype(np.int64))
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels.tolist())):
        p = out_dir / f"{i:04d}_{condition}{lab}.png"
        save_png(img, p, upscale)
        paths.append(p)
    return paths
