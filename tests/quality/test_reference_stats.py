"""Reference batches (guided-diffusion .npz): reading, checks and streaming feature statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner.errors import UserError
from tuner.quality.metrics import FeatureStats
from tuner.quality.reference_stats import compute_feature_stats, read_reference_batch, reference_stats


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """A 6-feature 'network': per-channel mean and mean square (inputs in [0, 1])."""
    return torch.cat([x.mean(dim=(2, 3)), x.pow(2).mean(dim=(2, 3))], 1)


def _batch(n=10, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def test_stats_from_images_match_direct_computation(tmp_path):
    images = _batch(10)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    calls = []
    stats = reference_stats(tmp_path / "ref.npz", mean_colour, resolution=32, batch_size=4,
                            progress=lambda done, total: calls.append((done, total)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    direct = FeatureStats.from_features(mean_colour(x))
    assert stats.n == 10 and calls == [(4, 10), (8, 10), (10, 10)]
    assert torch.allclose(stats.mean, direct.mean, atol=1e-12)
    assert torch.allclose(stats.cov, direct.cov, atol=1e-10)


def test_float_tensor_input_equals_uint8_input():
    images = _batch(6, side=8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    a = compute_feature_stats(images, mean_colour, batch_size=5)
    b = compute_feature_stats(x, mean_colour, batch_size=2)
    assert torch.allclose(a.cov, b.cov, atol=1e-10) and torch.allclose(a.mean, b.mean, atol=1e-12)


def test_precomputed_mu_sigma(tmp_path):
    mu, sigma = np.arange(6, dtype=np.float64), np.eye(6) * 2
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    stats = reference_stats(tmp_path / "stats.npz", mean_colour, resolution=256, num_features=6)
    assert stats.n == 0
    assert np.array_equal(stats.mean.numpy(), mu) and np.array_equal(stats.cov.numpy(), sigma)
    with pytest.raises(UserError, match="6 features but the feature network gives 2048"):
        reference_stats(tmp_path / "stats.npz", mean_colour, resolution=256, num_features=2048)


def test_images_preferred_over_mu_sigma(tmp_path):
    np.savez(tmp_path / "both.npz", arr_0=_batch(4), mu=np.zeros(6), sigma=np.eye(6))
    assert read_reference_batch(tmp_path / "both.npz").resolution == 32
    stats = reference_stats(tmp_path / "both.npz", mean_colour, resolution=32)
    assert stats.n == 4 and float(stats.mean.abs().sum()) > 0


def test_bad_reference_files(tmp_path):
    with pytest.raises(UserError, match="reference batch not found"):
        read_reference_batch(tmp_path / "missing.npz")
    np.savez(tmp_path / "big.npz", arr_0=_batch(3, side=64))
    with pytest.raises(UserError, match="64×64 images but the model makes 32×32"):
        read_reference_batch(tmp_path / "big.npz", resolution=32)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((3, 32, 32, 3), dtype=np.float32))
    with pytest.raises(UserError, match="must be uint8"):
        read_reference_batch(tmp_path / "float.npz")
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((3, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(UserError, match=r"\[N, H, H, 3\]"):
        read_reference_batch(tmp_path / "chw.npz")
    np.savez(tmp_path / "one.npz", arr_0=_batch(1))
    with pytest.raises(UserError, match="at least 2"):
        read_reference_batch(tmp_path / "one.npz")
    np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
    with pytest.raises(UserError, match="neither 'arr_0' images nor 'mu'/'sigma'"):
        read_reference_batch(tmp_path / "empty.npz")
    np.savez(tmp_path / "pickled.npz", arr_0=np.array([object()], dtype=object))
    with pytest.raises(UserError, match="refused for safety"):
        read_reference_batch(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="not an .npz of plain arrays"):
        read_reference_batch(tmp_path / "junk.npz")
