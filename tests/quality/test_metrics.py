"""PSNR, SSIM and Fréchet distance against hand-computed values; FeatureStats files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tuner.errors import UserError
from tuner.quality.metrics import (
    PSNR_CAP_DB,
    FeatureStats,
    fid_from_stats,
    fid_images,
    frechet_distance,
    psnr,
    ssim,
)


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 0.8 + 0.1


def test_psnr_identical_is_inf_and_constant_shift_is_exact():
    a = _images()
    assert psnr(a, a.clone()) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-5)  # MSE 0.01 → 20 dB
    # Mean of per-image values: shifts 0.1 and 0.01 → 20 dB and 40 dB → 30 dB.
    b = a.clone()
    b[:2] += 0.1
    b[2:] += 0.01
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-5)


def test_psnr_caps_near_identical_images():
    a = _images(2)
    b = a.clone()
    b[0] += 0.1  # 20 dB
    b[1, 0, 0, 0] += 1e-7  # differs far below one 8-bit level
    assert psnr(a, b) == pytest.approx((20.0 + PSNR_CAP_DB) / 2, abs=1e-5)


def test_ssim_identical_and_constant_images():
    a = _images()
    assert ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-6)
    # Constant images: no variance, so SSIM = (2·μa·μb + C1) / (μa² + μb² + C1) with C1 = (0.01·1)².
    x, y = torch.full((2, 3, 32, 32), 0.5), torch.full((2, 3, 32, 32), 0.4)
    c1 = 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.5 * 0.4 + c1) / (0.5 ** 2 + 0.4 ** 2 + c1), abs=1e-5)
    assert ssim(a, _images(seed=1)) < 0.5


def test_metrics_reject_mismatched_batches():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_images(2), _images(3))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(_images(2), _images(3))


def _design(mean, std, n=8):
    """Features whose sample mean and unbiased std are exactly ``mean`` and ``std``: orthogonal ±1 columns."""
    h = torch.tensor([[1, 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1],
                      [-1, 1, 1], [-1, -1, 1], [-1, 1, -1], [-1, -1, -1]], dtype=torch.float64)[:n]
    h = h * math.sqrt((n - 1) / n)  # unit unbiased variance per column; columns orthogonal, zero mean
    return torch.tensor(mean, dtype=torch.float64) + h * torch.tensor(std, dtype=torch.float64)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    a = _design([0.0, 1.0, -2.0], [1.0, 2.0, 0.5])
    b = _design([1.0, 1.0, 0.0], [3.0, 1.0, 0.5])
    # ||Δμ||² + Σ (σa − σb)² = (1 + 0 + 4) + (4 + 1 + 0) = 10
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-6)
    via_stats = fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert via_stats == pytest.approx(10.0, abs=1e-9)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-6)


def test_fid_from_stats_matches_two_by_two_closed_form():
    # For 2×2 SPD A, B: Tr √(AB) = √(Tr(AB) + 2·√det(AB)) (the eigenvalues of AB are real and positive).
    ca = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    cb = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    ma, mb = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = ca @ cb
    expected = float((ma - mb) @ (ma - mb) + ca.trace() + cb.trace()
                     - 2 * torch.sqrt(m.trace() + 2 * torch.sqrt(torch.det(m))))
    assert fid_from_stats(FeatureStats(ma, ca), FeatureStats(mb, cb)) == pytest.approx(expected, abs=1e-10)


def test_torchmetrics_path_agrees_with_stats_path_on_random_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                             dtype=torch.float64)
    b = torch.randn(150, 16, generator=g, dtype=torch.float64) * 1.5 + 0.3
    via_torchmetrics = frechet_distance(a, b)
    via_stats = fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))
    assert via_torchmetrics > 1.0
    assert via_torchmetrics == pytest.approx(via_stats, rel=1e-6)


def test_fid_images_uses_the_feature_network():
    class MeanColour(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    a = _images(8, seed=1)
    assert fid_images(a, a.clone(), MeanColour(), batch_size=3) == pytest.approx(0.0, abs=1e-6)
    shifted = fid_images(a, a + 0.1, MeanColour(), batch_size=3)
    assert shifted == pytest.approx(3 * 0.1 ** 2, abs=1e-5)  # pure mean shift of 0.1 in 3 channels


def test_frechet_distance_input_checks():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="equal F"):
        frechet_distance(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(UserError, match="different dimensions"):
        fid_from_stats(FeatureStats(torch.zeros(2), torch.eye(2)), FeatureStats(torch.zeros(3), torch.eye(3)))


def test_feature_stats_round_trip_and_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    stats = FeatureStats.from_features(torch.randn(50, 6, generator=g))
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 50 and torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    with pytest.raises(UserError, match="not found"):
        FeatureStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    with pytest.raises(UserError, match="no 'mu'/'sigma'"):
        FeatureStats.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(UserError, match="corrupt"):
        FeatureStats.load(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="corrupt"):
        FeatureStats.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(UserError, match=r"cov \[F, F\]"):
        FeatureStats.load(tmp_path / "shape.npz")
