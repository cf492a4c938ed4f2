"""Every cache policy family runs unchanged on the Infinity engine: the same KVCache, the same kernels.

For every family and conformance case (tests/policies/cases.py) on the Infinity cache geometry: the
bytes the cache allocates equal the planner's (``memory_report``), a keep-all case samples the full
cache's bits exactly, and every attention call equals full-K/V attention masked to exactly the positions
the cache reports it kept (the VAR engine's oracle, tests/policies/test_engine_oracle.py). The
family test also runs on a non-square schedule (4:3, its first 4 maps 1x1 2x2 4x3 8x6: the 8x6 map is
larger than the observation window, so score-based selections read a non-square window,
:func:`tuner.policies.selection.observation_window`).
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
from tuner.policies.registry import make_policy

SIDES = (1, 2, 4, 6)  # 4 scales, 57 tokens: enough history for windows, sinks and scores to differ
SHAPES_4X3 = ((1, 1), (2, 2), (4, 3), (8, 6))  # 65 tokens, a 128 x 96 image


def _run(directory, **schedule):
    model_path, vae_path, _, _ = write_official_checkpoints(directory)
    loaded = load_infinity(model_path, vae_path, **schedule)
    text, lens = random_text(2, 256, 9, seed=7, lens=(9, 4))

    def generate(**kw):
        return generate_infinity(loaded.model, loaded.vae, text, lens, seed=13, **kw)

    return loaded, generate, generate()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("infinity_cache"), sides=SIDES)


@pytest.fixture(scope="module")
def run_4x3(tmp_path_factory):
    run = _run(tmp_path_factory.mktemp("infinity_cache_4x3"), h_div_w=1.333, scales=len(SHAPES_4X3))
    assert run[0].engine.schedule == SHAPES_4X3 and not run[0].engine.geometry.is_square
    assert run[2].images.shape == (2, 3, 128, 96)
    return run


@pytest.mark.parametrize("schedule", ["run", "run_4x3"])
@pytest.mark.parametrize("family,index", case_ids())
def test_every_family_allocates_its_plan_and_attends_to_what_it_kept(request, schedule, family, index):
    loaded, generate, full = request.getfixturevalue(schedule)
    g = loaded.engine.geometry
    policy, case = build(family, index, g)
    spec = PolicySpec(g, loaded.config.name, synthetic_calibration(g, seed=index))
    oracle = Oracle(g)
    res = generate(policy=policy, spec=spec, audit=oracle)
    report = memory_report(policy, g, dtype="fp32", cfg=True, batch=2, spec=spec)
    assert res.kv_bytes_allocated == report.kv_bytes_total
    assert res.plan == report.plan
    assert oracle.checked == g.num_layers * g.num_scales
    assert res.images.shape == full.images.shape and bool(torch.isfinite(res.images).all())
    if case.get("keeps_all"):
        assert all(torch.equal(a, b) for a, b in zip(res.tokens, full.tokens))
        assert torch.equal(res.images, full.images)


@pytest.mark.parametrize("family,params", [
    ("sink_window", {"sink_scales": 1, "window": 1}),
    ("scalekv", {"budget_fraction": 0.3, "kv_format": "int8"}),
    ("window", {"window": 2, "kv_format": "int4"}),
])
def test_compressed_and_quantized_plans_allocate_what_is_planned(run, family, params):
    loaded, generate, full = run
    g = loaded.engine.geometry
    policy = make_policy(family, params)
    spec = PolicySpec(g, loaded.config.name, synthetic_calibration(g))
    res = generate(policy=policy, spec=spec)
    report = memory_report(policy, g, dtype="fp32", cfg=True, batch=2, spec=spec)
    assert res.kv_bytes_allocated == report.kv_bytes_total < full.kv_bytes_allocated
    assert not all(torch.equal(a, b) for a, b in zip(res.tokens, full.tokens))  # the policy acted
    assert float((res.images - full.images).abs().mean()) < 0.5


def test_unguided_run_plans_one_row_per_prompt(run):
    loaded, generate, _ = run
    g = loaded.engine.geometry
    policy = make_policy("sink_window", {"sink_scales": 1, "window": 1})
    res = generate(policy=policy, cfg=1.0)
    assert res.kv_bytes_allocated == memory_report(policy, g, dtype="fp32", cfg=False, batch=2).kv_bytes_total


@pytest.mark.parametrize("family,index", [("sink_window", 1), ("heatkv", 1)])
def test_triton_backend_attends_like_the_oracle(run, family, index):
    """The Triton kernels (per-layer and packed per-head buffers; the CPU interpreter without a GPU)."""
    loaded, generate, _ = run
    g = loaded.engine.geometry
    policy, _ = build(family, index, g)
    spec = PolicySpec(g, loaded.config.name, synthetic_calibration(g, seed=index))
    oracle = Oracle(g)
    res = generate(policy=policy, spec=spec, audit=oracle, backend="triton")
    assert oracle.checked == g.num_layers * g.num_scales
    assert res.kv_bytes_allocated == memory_report(policy, g, dtype="fp32", batch=2, spec=spec).kv_bytes_total


def test_observer_sees_every_layer_and_scale(run):
    """The calibration hook gets the same calls as on VAR: per scale and layer, all tokens so far."""
    loaded, generate, _ = run
    g = loaded.engine.geometry
    calls = []
    generate(observer=lambda layer, s, q, k, v, pos: calls.append((layer, s, k.shape[2], pos.shape[2])))
    assert calls == [(layer, s, g.tokens_through(s), g.tokens_through(s))
                     for s in range(g.num_scales) for layer in range(g.num_layers)]
