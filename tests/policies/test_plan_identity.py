"""The evaluation-cache key is the compiled plan (budgets + selection rule): policies with equal keys
generate equal images, and what selects or keeps differently never shares a key."""
from __future__ import annotations

import pytest
import torch

from tests.policies.cases import build, case_ids
from tests.policies.helpers import synthetic_calibration
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.registry import make_policy
from tuner.presets import budgets_form
from tuner.search.trials import plan_hash

LABELS = torch.tensor([3, 5])


def spec_of(model, seed=0):
    g = CacheGeometry.from_var_config(model.config.var)
    return PolicySpec(g, model.config.name, synthetic_calibration(g, seed=seed))


def images(model, policy, spec):
    return generate(model.var, model.vae, LABELS, seed=5, policy=policy, spec=spec).images


@pytest.mark.parametrize("family, cap", [("window", 3), ("sink_window", 4)])
def test_a_baseline_and_its_budgets_form_share_a_key_and_generate_the_same_images(small_model, family, cap):
    spec = spec_of(small_model)
    g = spec.geometry
    sinks = {"sink_scales": 1} if family == "sink_window" else {}
    params = {"window": g.num_scales, "max_tokens": cap, **sinks}
    baseline = make_policy(family, params)
    form = budgets_form(baseline, g)
    assert form.family == "budgets"
    assert plan_hash(baseline, spec) == plan_hash(form, spec)
    assert torch.equal(images(small_model, baseline, spec), images(small_model, form, spec))


def test_same_budgets_with_another_selection_rule_get_another_key(small_model):
    spec = spec_of(small_model)
    g = spec.geometry
    recent = make_policy("window", {"window": g.num_scales, "max_tokens": 4})
    sinks = make_policy("sink_window", {"window": g.num_scales, "max_tokens": 4, "sink_scales": 1})
    assert recent.plan(spec) == sinks.plan(spec)
    assert plan_hash(recent, spec) != plan_hash(sinks, spec)
    assert not torch.equal(images(small_model, recent, spec), images(small_model, sinks, spec))


def test_every_conformance_case_has_a_key_that_changes_with_its_budgets(small_model):
    """Keys are computed for every family and case; distinct plans never collide."""
    spec = spec_of(small_model)
    g = spec.geometry
    keys = {}
    for family, index in case_ids():
        policy, _ = build(family, index, g)
        plan = policy.plan(spec)
        key = plan_hash(policy, spec)
        doc = (plan.budgets, plan.full, repr(sorted(policy.selection(g).items())))
        assert keys.setdefault(key, doc) == doc, (family, index)
