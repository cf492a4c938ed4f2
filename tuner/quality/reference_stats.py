"""Reference statistics for ``fid`` / ``delta_fid``: from a user-supplied reference batch or images.

A reference batch is an ``.npz`` in the OpenAI guided-diffusion format: ``arr_0`` uint8
``[N, H, W, 3]`` images, and/or precomputed ``mu`` / ``sigma``. When images are present they are
preferred: their statistics are recomputed with *our* feature network, so policy features and
reference features come from the same network (the shipped ``mu``/``sigma`` were computed with
TensorFlow's Inception, close to but not bit-equal with the torch port).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner.errors import UserError
from tuner.quality.metrics import FeatureStats

Progress = Callable[[int, int], None]  # (images done, images total)


@dataclass(frozen=True)
class ReferenceBatch:
    """Contents of a reference ``.npz``: ``images`` uint8 ``[N, H, W, 3]`` and/or ``stats``."""

    path: Path
    images: np.ndarray | None
    stats: FeatureStats | None

    @property
    def resolution(self) -> int | None:
        return None if self.images is None else int(self.images.shape[1])


def read_reference_batch(path: str | Path, resolution: int | None = None) -> ReferenceBatch:
    """Read and check a reference batch.

    Parameters
    ----------
    path : str or Path
        ``.npz`` with ``arr_0`` (uint8 ``[N, H, W, 3]``) and/or ``mu`` ``[F]`` + ``sigma`` ``[F, F]``.
    resolution : int, optional
        Required image side; images of another size are a :class:`~tuner.errors.UserError`.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reference batch not found: {p}; pass the .npz reference batch for this model's "
                        "resolution (e.g. VIRTUAL_imagenet256_labeled.npz)")
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = set(data.files)
            images = data["arr_0"] if "arr_0" in keys else None
            stats = None
            if "mu" in keys and "sigma" in keys:
                stats = FeatureStats(torch.from_numpy(np.asarray(data["mu"], dtype=np.float64)),
                                     torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64)),
                                     int(data["n"]) if "n" in keys else 0)
    except UserError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # object arrays, or not an .npz at all (numpy then falls back to unpickling)
            raise UserError(f"{p} is not an .npz of plain arrays (reading it would need unpickling, which is "
                            "refused for safety); pass a reference batch with arr_0 uint8 [N,H,W,3] or "
                            "mu/sigma") from None
        raise UserError(f"{p} is not a valid reference batch ({exc}); expected arr_0 uint8 [N,H,W,3] or "
                        "mu/sigma") from None
    except Exception as exc:  # noqa: BLE001  (zip or header errors: a bad file)
        raise UserError(f"cannot read {p} as .npz ({type(exc).__name__}); the file is corrupt") from None
    if images is None and stats is None:
        names = ", ".join(sorted(keys)) or "none"
        raise UserError(f"{p} has neither 'arr_0' images nor 'mu'/'sigma' (keys: {names});"
                        " pass a guided-diffusion style reference batch")
    if images is not None:
        square_rgb = images.ndim == 4 and images.shape[3] == 3 and images.shape[1] == images.shape[2]
        if images.dtype != np.uint8 or not square_rgb:
            raise UserError(f"{p}: 'arr_0' must be uint8 [N, H, H, 3] images, got {images.dtype} "
                            f"{list(images.shape)}")
        if images.shape[0] < 2:
            raise UserError(f"{p}: the reference batch has {images.shape[0]} image(s); FID needs at least 2")
        if resolution is not None and images.shape[1] != resolution:
            side = images.shape[1]
            raise UserError(f"{p} holds {side}×{side} images but the model makes {resolution}×{resolution}; "
                            f"pass the reference batch for {resolution}×{resolution}")
    return ReferenceBatch(p, images, stats)


@torch.no_grad()
def compute_feature_stats(images: np.ndarray | torch.Tensor, feature: Callable[[torch.Tensor], torch.Tensor],
                          batch_size: int = 100, device: str | torch.device = "cpu",
                          progress: Progress | None = None) -> FeatureStats:
    """Streaming mean/covariance of ``feature`` over a large image set.

    Parameters
    ----------
    images : uint8 ``[N, H, W, 3]`` (numpy, reference-batch layout) or float Tensor ``[N, 3, H, W]`` in [0, 1]
    feature : callable
        ``[B, 3, H, W]`` in [0, 1] on ``device`` → ``[B, F]``.
    progress : callable, optional
        Called as ``progress(done, total)`` after every batch.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    total_n = int(images.shape[0])
    if total_n < 2:
        raise ValueError("need at least 2 images")
    total = outer = None
    for start in range(0, total_n, batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(chunk, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float().div_(255)
        else:
            x = chunk.float()
        f = feature(x.to(device)).double().cpu()
        # Sums in float64 so that large reference sets lose no precision in the covariance.
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        if progress is not None:
            progress(min(start + batch_size, total_n), total_n)
    return FeatureStats.from_sums(total, outer, total_n)


def reference_stats(path: str | Path, feature: Callable[[torch.Tensor], torch.Tensor], resolution: int,
                    num_features: int | None = None, batch_size: int = 100,
                    device: str | torch.device = "cpu", progress: Progress | None = None) -> FeatureStats:
    """Reference :class:`FeatureStats` for a model from a reference batch file.

    Images (``arr_0``) are embedded with ``feature``; a file with only ``mu``/``sigma`` is used as is,
    after checking its dimension against ``num_features`` when given.
    """
    batch = read_reference_batch(path, resolution)
    if batch.images is not None:
        return compute_feature_stats(batch.images, feature, batch_size=batch_size, device=device,
                                     progress=progress)
    stats = batch.stats  # read_reference_batch guarantees images or statistics
    if num_features is not None and stats.dim != num_features:
        raise UserError(f"{batch.path}: mu/sigma have {stats.dim} features but the feature network gives "
                        f"{num_features}; pass a reference batch with images or statistics from this network")
    return stats
