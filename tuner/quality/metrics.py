"""Image-quality metrics: PSNR, SSIM and the Fréchet distance (FID) on feature vectors.

All image metrics take batches ``[N, 3, H, W]`` in ``[0, 1]``. FID between two sets of images or
features goes through torchmetrics' ``FrechetInceptionDistance`` with our own feature network as
``feature=`` (the Inception download cannot work offline). Cached reference statistics use
:class:`FeatureStats` and :func:`fid_from_stats`, the same formula in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuner.errors import UserError

# Per-image PSNR cap: about the quantization floor of 8-bit images (58.9 dB), so images that differ by
# less than one PNG level count as identical rather than sending the mean to a huge value.
PSNR_CAP_DB = 60.0


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4 or a.shape[0] == 0:
        raise ValueError(f"expected non-empty image batches [N, C, H, W], got {tuple(a.shape)}")


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, data range 1) of ``[N, C, H, W]`` batches in ``[0, 1]``: float64 ``[N]``,
    each value capped at :data:`PSNR_CAP_DB` (identical images score the cap)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse.clamp_min(1e-300))).clamp(max=PSNR_CAP_DB)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR (dB), data range 1.

    Parameters
    ----------
    a, b : Tensor ``[N, C, H, W]`` in ``[0, 1]``

    Returns
    -------
    float: ``inf`` when every image pair is identical; otherwise the mean of per-image values,
    each capped at :data:`PSNR_CAP_DB`.
    """
    _check_pair(a, b)
    if bool(torch.equal(a, b)):
        return math.inf
    return float(psnr_per_image(a, b).mean())


def feature_distance_per_image(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Squared distance between paired feature vectors ``[N, F]`` (the same seed's image under a policy
    and under the full cache): float64 ``[N]``. Its mean is the paired feature metric ``feat_dist``;
    unlike a Fréchet distance it has a per-image spread, so its standard error is known at any N."""
    if fa.shape != fb.shape or fa.dim() != 2:
        raise ValueError(f"expected paired features [N, F], got {tuple(fa.shape)} and {tuple(fb.shape)}")
    return (fa.double() - fb.double()).pow(2).sum(1)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample SD / sqrt(N); 0 for N = 1) of ``[N]`` values."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    se = float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return float(v.mean()), se


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-image SSIM of ``[N, C, H, W]`` batches in [0, 1]: float64 ``[N]``.

    torchmetrics' SSIM: Gaussian 11×11 window, σ 1.5, data range 1.

    Computed in float64: SSIM subtracts products of local means, and in float32 that cancellation
    alone moves the result by ~3e-5, enough to blur small differences between policies.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    out = [structural_similarity_index_measure(x.double(), y.double(), data_range=1.0, reduction="none")
           for x, y in zip(torch.split(a, batch_size), torch.split(b, batch_size))]
    return torch.cat([o.reshape(-1) for o in out])


def ssim(a: torch.Tensor, b: torch.Tensor, batch_size: int = 64) -> float:
    """Mean SSIM of ``[N, C, H, W]`` batches in [0, 1] (see :func:`ssim_per_image`)."""
    return float(ssim_per_image(a, b, batch_size).mean())


class _Identity(nn.Module):
    """A 'feature network' that returns its input: lets precomputed features through torchmetrics' FID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _fid_metric(feature: nn.Module):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # normalize=True: inputs are floats in [0, 1]; with a custom network torchmetrics passes them as is.
    return FrechetInceptionDistance(feature=feature, normalize=True)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between two sets of feature vectors (torchmetrics' FID computation).

    Parameters
    ----------
    feats_a, feats_b : Tensor ``[N_a, F]``, ``[N_b, F]``, ``N_a, N_b >= 2``

    Returns
    -------
    float: ``||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½)`` with unbiased covariances.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected features [N, F] of equal F, got {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    metric = _fid_metric(_Identity(feats_a.shape[1]))
    metric.update(feats_a.double(), real=True)
    metric.update(feats_b.double(), real=False)
    return float(metric.compute())


def fid_images(images_a: torch.Tensor, images_b: torch.Tensor, feature: nn.Module,
               batch_size: int = 256) -> float:
    """FID between two image sets with ``feature`` as torchmetrics' feature extractor.

    Parameters
    ----------
    images_a, images_b : Tensor ``[N, 3, H, W]`` in ``[0, 1]`` (``N >= 2``), on ``feature``'s device
    feature : nn.Module
        ``forward(imgs) -> [N, F]``, e.g. :class:`tuner.quality.features.FeatureNet` or the FID Inception.
    """
    metric = _fid_metric(feature)
    with torch.no_grad():
        for imgs, real in ((images_a, True), (images_b, False)):
            for chunk in torch.split(imgs, batch_size):
                metric.update(chunk, real=real)
    return float(metric.compute())


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (what FID compares), float64.

    ``mean``: ``[F]``; ``cov``: ``[F, F]`` (unbiased); ``n``: samples it came from (0 if unknown,
    e.g. statistics shipped as a reference batch's ``mu``/``sigma``).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    n: int = 0

    def __post_init__(self) -> None:
        if self.mean.dim() != 1 or self.cov.shape != (self.mean.shape[0], self.mean.shape[0]):
            raise ValueError(f"mean [F] and cov [F, F] expected, got {tuple(self.mean.shape)} and "
                             f"{tuple(self.cov.shape)}")
        if self.n < 0:
            raise ValueError("n must be >= 0")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, feats: torch.Tensor) -> FeatureStats:
        """Statistics of ``feats [N, F]`` (``N >= 2``)."""
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, F], got {tuple(feats.shape)}")
        x = feats.detach().double().cpu()
        return cls(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]), int(x.shape[0]))

    @classmethod
    def from_sums(cls, total: torch.Tensor, outer: torch.Tensor, n: int) -> FeatureStats:
        """From streaming sums: ``total = Σx [F]``, ``outer = Σ x xᵀ [F, F]`` over ``n >= 2`` samples."""
        if n < 2:
            raise ValueError("need at least 2 samples")
        mean = total.double() / n
        cov = (outer.double() - n * torch.outer(mean, mean)) / (n - 1)
        return cls(mean, cov, int(n))

    def save(self, path: str | Path) -> None:
        """Write ``.npz`` with ``mu``, ``sigma`` (the reference-batch key names) and ``n``."""
        np.savez(path, mu=self.mean.detach().cpu().numpy(), sigma=self.cov.detach().cpu().numpy(),
                 n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by :meth:`save` (or any ``.npz`` with ``mu`` and ``sigma``)."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"feature statistics file not found: {p}; check the path")
        try:
            with np.load(p, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    keys = ", ".join(data.files) or "none"
                    raise UserError(f"{p} has no 'mu'/'sigma' arrays (keys: {keys}); "
                                    "pass statistics written by the tuner or a reference batch with mu/sigma")
                mu, sigma = data["mu"], data["sigma"]
                n = int(data["n"]) if "n" in data else 0
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001  (zip, header or dtype errors: a bad file)
            raise UserError(f"cannot read {p} as .npz ({type(exc).__name__}); the file is corrupt or holds "
                            "pickled objects: write it again with FeatureStats.save") from None
        try:
            return cls(torch.from_numpy(np.asarray(mu, dtype=np.float64)),
                       torch.from_numpy(np.asarray(sigma, dtype=np.float64)), n)
        except ValueError as exc:
            raise UserError(f"{p}: {exc}") from None


def _trace_sqrt_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Tr((A B)^½)`` for symmetric PSD ``A, B`` via ``Tr((A^½ B A^½)^½)`` — symmetric eigen-decompositions
    only, which stay real and stable where ``eig(A B)`` can return small complex parts."""
    w, v = torch.linalg.eigh(a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root_a @ b @ root_a
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians given as :class:`FeatureStats` (closed form, float64)."""
    if a.dim != b.dim:
        raise UserError(f"feature statistics have different dimensions ({a.dim} vs {b.dim}): they come from "
                        "different feature networks; recompute the reference statistics with this model's "
                        "network")
    diff = a.mean.double() - b.mean.double()
    ca, cb = a.cov.double(), b.cov.double()
    value = diff @ diff + torch.trace(ca) + torch.trace(cb) - 2 * _trace_sqrt_product(ca, cb)
    return float(value)
