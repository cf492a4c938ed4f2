"""Every cache policy family on a non-square Infinity schedule (4:3, its first 4 maps 1x1 2x2 4x3 8x6):
the cache allocates exactly the planner's bytes, a keep-all case samples the full cache's bits, and
every attention call equals full-K/V attention masked to the positions the cache reports it kept (the
oracle of tests/policies/test_engine_oracle.py). The 8x6 map is larger than the observation window, so
score-based selections read a non-square window (:func:`tuner.policies.selection.observation_window`).
"""
from __future__ import annotations

import pytest
import torch

from tests.model.infinity_official_reading import write_official_checkpoints
from tests.policies.cases import build, case_ids
from tests.policies.helpers import synthetic_calibration
from tests.policies.test_engine_oracle import Oracle
from tuner.memory import memory_report
from tuner.model.infinity_generate import generate_infinity, random_text
from tuner.model.infinity_loading import load_infinity
from tuner.policies.base import PolicySpec

SHAPES = ((1, 1), (2, 2), (4, 3), (8, 6))  # 65 tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model_path, vae_path, _, _ = write_official_checkpoints(tmp_path_factory.mktemp("infinity_aspect_cache"))
    loaded = load_infinity(model_path, vae_path, h_div_w=1.333, scales=len(SHAPES))
    assert loaded.engine.schedule == SHAPES
    text, lens = random_text(2, 256, 9, seed=7, lens=(9, 4))

    def generate(**kw):
        return generate_infinity(loaded.model, loaded.vae, text, lens, seed=13, **kw)

    return loaded, generate, generate()


@pytest.mark.parametrize("family,index", case_ids())
def test_every_family_allocates_its_plan_on_a_non_square_schedule(run, family, index):
    loaded, generate, full = run
    g = loaded.engine.geometry
    assert not g.is_square
    policy, case = build(family, index, g)
    spec = PolicySpec(g, loaded.config.name, synthetic_calibration(g, seed=index))
    oracle = Oracle(g)
    res = generate(policy=policy, spec=spec, audit=oracle)
    report = memory_report(policy, g, dtype="fp32", cfg=True, batch=2, spec=spec)
    assert res.kv_bytes_allocated == report.kv_bytes_total
    assert res.plan == report.plan
    assert oracle.checked == g.num_layers * g.num_scales
    assert res.images.shape == full.images.shape == (2, 3, 128, 96)
    assert bool(torch.isfinite(res.images).all())
    if case.get("keeps_all"):
        assert all(torch.equal(a, b) for a, b in zip(res.tokens, full.tokens))
        assert torch.equal(res.images, full.images)
