"""Paper presets and LLM baselines at the same memory."""
from __future__ import annotations

import pytest
import torch

from tests.policies.helpers import D30, TINY, synthetic_calibration
from tuner.errors import UserError
from tuner.memory import memory_report
from tuner.model.config import model_config
from tuner.policies.base import PolicySpec
from tuner.presets import paper_presets


@pytest.mark.parametrize("name,g", [("d30", D30), ("tiny", TINY)])
def test_baselines_match_each_method_memory(name, g):
    cal = synthetic_calibration(g, seed=5, name=name)
    presets = paper_presets(model_config(name), cal)
    assert list(presets) == ["ams", "window@ams", "sink_window@ams", "scalekv_10", "window@scalekv_10",
                             "sink_window@scalekv_10", "scalekv_20", "window@scalekv_20",
                             "sink_window@scalekv_20", "hack", "window@hack", "sink_window@hack", "heatkv",
                             "window@heatkv", "sink_window@heatkv"]
    spec = PolicySpec(g, name, cal)
    per_token = memory_report(presets["ams"], g, spec=spec).bytes_per_token
    for method in ("ams", "scalekv_10", "scalekv_20", "hack", "heatkv"):
        target = memory_report(presets[method], g, spec=spec).kv_bytes_per_image
        for base in ("window", "sink_window"):
            got = memory_report(presets[f"{base}@{method}"], g, spec=spec).kv_bytes_per_image
            assert target - g.num_layers * per_token < got <= target


def test_d30_preset_numbers():
    cal = synthetic_calibration(D30, seed=0, name="d30")
    presets = paper_presets(model_config("d30"), cal)
    # AMS: (22 × 174 + 8 × 274) / 30 = 200.67 → cap 200 tokens per layer
    assert presets["window@ams"].max_tokens == 200
    assert presets["sink_window@ams"].sink_scales == 2
    assert presets["scalekv_10"].budget_fraction == 0.10


def test_presets_need_calibration():
    with pytest.raises(UserError, match="tuner calibrate"):
        paper_presets(model_config("d30"))
    with pytest.raises(UserError, match="recalibrate"):
        paper_presets(model_config("d16"), synthetic_calibration(D30))


@pytest.mark.parametrize("g", [TINY, D30], ids=["tiny", "d30"])
def test_budgets_form_of_a_baseline_plans_and_selects_the_same_tokens(g):
    from tests.policies.helpers import simulate
    from tuner.presets import budgets_form

    spec = PolicySpec(g, "synthetic", synthetic_calibration(g))
    presets = paper_presets(model_config("d30" if g is D30 else "tiny"), spec.calibration)
    for name in ("window@ams", "sink_window@scalekv_10"):
        base = presets[name]
        form = budgets_form(base, g)
        rule = "recent" if base.family == "window" else "sink_recent"
        assert form.family == "budgets" and form.rule == rule
        assert form.plan(spec).budgets == base.plan(spec).budgets
        kept_base, kept_form = simulate(base, spec), simulate(form, spec)
        for layer in range(g.num_layers):
            for s in range(g.num_scales):
                assert torch.equal(kept_base[layer][s], kept_form[layer][s])
    assert budgets_form(presets["ams"], g) is None and budgets_form(presets["scalekv_10"], g) is None
