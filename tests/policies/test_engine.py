"""Policies inside the real engine (tuner/model/generate.py) on a tiny random model.

Not skipped when something is missing: these are the end-to-end guarantees (allocated bytes ==
planned bytes, full budget == bit-identical images, calibration from real generations).
"""
from __future__ import annotations

import pytest
import torch

from tests.policies.cases import build, case_ids
from tests.policies.helpers import synthetic_calibration
from tuner.calibration import CalibrationSpec, calibrate
from tuner.memory import memory_report
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.registry import make_policy

LABELS = torch.tensor([1, 7])


@pytest.fixture(scope="module")
def full_images(small_model):
    return generate(small_model.var, small_model.vae, LABELS, seed=11).images


def check_allocated_bytes_equal_planned(small_model, full_images, family: str, index: int) -> None:
    """One case in the real engine: allocated bytes == planned bytes; a keep-all case is bit-identical."""
    g = CacheGeometry.from_var_config(small_model.config.var)
    policy, case = build(family, index, g)
    spec = PolicySpec(g, small_model.config.name, synthetic_calibration(g, seed=index))
    res = generate(small_model.var, small_model.vae, LABELS, seed=11, policy=policy, spec=spec)
    report = memory_report(policy, small_model.config, dtype="fp32", cfg=True, batch=len(LABELS), spec=spec)
    assert res.kv_bytes_allocated == report.kv_bytes_total
    assert res.plan == report.plan
    assert res.images.shape == full_images.shape
    if case.get("keeps_all"):
        assert torch.equal(res.images, full_images)


@pytest.mark.parametrize("family,index", case_ids())
def test_allocated_bytes_equal_planned_and_full_budget_is_identical(small_model, full_images, family, index):
    check_allocated_bytes_equal_planned(small_model, full_images, family, index)


def test_calibration_from_real_generations_drives_the_calibrated_families(small_model):
    cfg = small_model.config
    g = CacheGeometry.from_var_config(cfg.var)
    done = []
    cal = calibrate(small_model.var, small_model.vae, cfg,
                    spec=CalibrationSpec(samples=3, batch_size=2, seed=1),
                    progress=lambda d, t: done.append((d, t)), checkpoint_sha256="random:0")
    assert done == [(2, 3), (3, 3)]
    assert cal.num_layers == g.num_layers and cal.checkpoint_sha256 == "random:0"
    for layer in range(g.num_layers):
        for s in range(1, g.num_scales):
            assert 0.0 < cal.car[layer][s] < 1.0 and 0.0 < cal.htk[layer][s] <= 1.0 - cal.car[layer][s] + 1e-6
            assert -2.0 <= cal.key_similarity[layer][s] <= 0.0  # unit keys
            total = sum(cal.density[layer][s][i] * g.scale_lengths[i] for i in range(s + 1))
            assert total == pytest.approx(g.scale_lengths[s], rel=1e-4)
    spec = PolicySpec(g, cfg.name, cal)
    for family, params in (("ams", {"window": 1, "window_demanding": 2, "theta_quantile": 0.5}),
                           ("scalekv", {"budget_fraction": 0.3, "n_drafters": 1})):
        policy = make_policy(family, params)
        res = generate(small_model.var, small_model.vae, LABELS, seed=2, policy=policy, spec=spec)
        report = memory_report(policy, cfg, dtype="fp32", batch=2, spec=spec)
        assert res.kv_bytes_allocated == report.kv_bytes_total


def test_calibration_progress_per_scale_is_finer_and_the_statistics_do_not_change(small_model):
    """``progress_per_scale``: a fractional count after every scale of a batch (by tokens), the
    batches' ends still whole; the statistics are those of the plain run."""
    cfg = small_model.config
    g = CacheGeometry.from_var_config(cfg.var)
    spec = CalibrationSpec(samples=3, batch_size=2, seed=1)
    done = []
    fine = calibrate(small_model.var, small_model.vae, cfg, spec=spec, progress_per_scale=True,
                     progress=lambda d, t: done.append((d, t)), checkpoint_sha256="random:0")
    plain = calibrate(small_model.var, small_model.vae, cfg, spec=spec, checkpoint_sha256="random:0")
    assert fine == plain
    assert len(done) == 2 * g.num_scales and {t for _, t in done} == {3}
    counts = [d for d, _ in done]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[g.num_scales - 1] == 2 and counts[-1] == 3  # the batches' ends, as ints
    assert isinstance(counts[-1], int)
    share = g.tokens_through(0) / g.tokens_through(g.num_scales - 1)
    assert counts[0] == pytest.approx(2 * share) and counts[g.num_scales] == pytest.approx(2 + share)
