"""Fitting a policy's budget knob to a memory target (tuner.policies.fit)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.policies.helpers import D30, TINY, spec_for, synthetic_calibration
from tuner.memory import memory_report
from tuner.model.config import model_config
from tuner.policies.ams import AMSPolicy
from tuner.policies.base import PolicySpec
from tuner.policies.budgets import BudgetsPolicy
from tuner.policies.fit import fit_to_memory, memory_knob
from tuner.policies.full import FullPolicy
from tuner.policies.scalekv import ScaleKVPolicy
from tuner.policies.sink_window import SinkWindowPolicy
from tuner.policies.window import WindowPolicy
from tuner.presets import paper_presets


def _policies(g):
    return [
        WindowPolicy(window=g.num_scales, max_tokens=5),
        SinkWindowPolicy(sink_scales=2, window=g.num_scales, max_tokens=5),
        AMSPolicy(n_condensed=2, window=1, window_demanding=2, theta_quantile=0.25),
        AMSPolicy(n_condensed=1, window=2, window_demanding=3, theta_quantile=0.5, c_min=10, c_max=40),
        ScaleKVPolicy(budget_fraction=0.3),
        BudgetsPolicy(scale_curve=(0.9, 0.5, 0.2, 0.6, 0.1, 0.05, 0.3, 0.2, 0.1)[: g.num_scales - 1],
                      rule="sink_recent", sink_scales=1),
        BudgetsPolicy(scale_curve=(1.0,) * (g.num_scales - 1), max_tokens=7, rule="recent",
                      layer_weights=tuple(0.5 + i for i in range(g.num_layers))),
    ]


@pytest.mark.parametrize("g", [TINY, D30], ids=["tiny", "d30"])
@pytest.mark.parametrize("target", [0.10, 0.15, 0.25])
def test_fitted_policy_fills_but_never_exceeds_the_target(g, target):
    spec = spec_for(g)

    def fraction(p):
        return memory_report(p, g, spec=spec).fraction

    for policy in _policies(g):
        fitted = fit_to_memory(policy, g, lambda p: fraction(p) <= target)
        assert fitted is not None, policy
        assert type(fitted) is type(policy)
        got = fraction(fitted)
        assert got <= target
        knob = memory_knob(policy, g)
        if knob.integer:  # one more token per layer would not fit (or the knob is at its top)
            name = "max_tokens" if hasattr(fitted, "max_tokens") else "c_min"
            value = getattr(fitted, name)
            if value < knob.high:
                assert fraction(knob.apply(value + 1)) > target, policy
        else:  # a float knob is within one token per layer of the target
            per_layer_token = 1.0 / g.seq_len
            near = got > target - 2 * per_layer_token * g.num_scales
            assert near or fraction(knob.apply(knob.high)) <= target
        # the shape is kept: only the knob moved
        if isinstance(policy, BudgetsPolicy):
            assert fitted.rule == policy.rule and fitted.sink_scales == policy.sink_scales
        if isinstance(policy, AMSPolicy):
            assert (fitted.n_condensed, fitted.window, fitted.window_demanding) == \
                (policy.n_condensed, policy.window, policy.window_demanding)


def test_fitting_is_deterministic_and_idempotent():
    spec = spec_for(TINY)
    fits = lambda p: memory_report(p, TINY, spec=spec).fraction <= 0.15  # noqa: E731
    for policy in _policies(TINY):
        once = fit_to_memory(policy, TINY, fits)
        assert fit_to_memory(policy, TINY, fits) == once
        again = fit_to_memory(once, TINY, fits)  # refitting a fitted policy lands on the same memory
        assert memory_report(again, TINY, spec=spec).fraction == memory_report(once, TINY, spec=spec).fraction


def test_unfittable_and_knobless_policies():
    spec = spec_for(TINY)

    def fits(limit):
        return lambda p: memory_report(p, TINY, spec=spec).fraction <= limit

    # the full cache has no knob: kept when it fits, None when it does not
    assert fit_to_memory(FullPolicy(), TINY, fits(1.0)) == FullPolicy()
    assert fit_to_memory(FullPolicy(), TINY, fits(0.5)) is None
    # ams pins whole condensed scales: below their size nothing fits
    assert fit_to_memory(AMSPolicy(n_condensed=3, window=1, window_demanding=1), TINY, fits(0.001)) is None
    # an explicit budget table is taken as it is
    table = BudgetsPolicy(table=((1, 1, 0, 0, 0, 0, 0),) * TINY.num_layers)
    assert memory_knob(table, TINY) is None
    assert fit_to_memory(table, TINY, fits(0.5)) == table
    # a planning error counts as "does not fit"
    assert fit_to_memory(replace(ScaleKVPolicy(), budget_fraction=0.2), TINY, lambda p: (_ for _ in ()).throw(
        ValueError("no"))) is None


# Fitted knob values pinned from the fitter as it was before each family declared its own knob
# (``if family == ...`` in tuner/policies/fit.py): the paper presets (and two budgets forms and a capped
# AMS) at 10/15/25% on tiny and d30, synthetic calibration seed 5, rule memory_report(...).fraction <= target.
# Per (model, target): ams (c_min, c_max), capped ams (c_min, c_max), scalekv_10 and scalekv_20
# budget_fraction, the six token-cap baselines' max_tokens, budgets cap form max_tokens, budgets curve.
PINNED = {
    ("tiny", 0.10): ((3, 6), (1, 4), 0.0384, 4, 4,
                     [0.22491000000000003, 0.12495, 0.049980000000000004, 0.14994, 0.024990000000000002,
                      0.012495000000000001]),
    ("tiny", 0.15): ((9, 18), (5, 20), 0.0934, 12, 12,
                     [0.6249600000000001, 0.3472, 0.13888, 0.41664, 0.06944, 0.03472]),
    ("tiny", 0.25): ((21, 42), (11, 44), 0.2692, 28, 28,
                     [1.0, 1.0, 0.8928400000000001, 1.0, 0.44642000000000004, 0.22321000000000002]),
    ("d30", 0.10): ((46, 92), (23, 92), 0.0813, 59, 59,
                    [1.0, 0.5833, 0.23332000000000003, 0.69996, 0.11666000000000001, 0.05833000000000001,
                     0.34998, 0.23332000000000003, 0.11666000000000001]),
    ("d30", 0.15): ((73, 146), (37, 148), 0.1497, 93, 93,
                    [1.0, 0.91665, 0.36666, 1.0, 0.18333, 0.091665, 0.54999, 0.36666, 0.18333]),
    ("d30", 0.25): ((127, 254), (64, 256), 0.3195, 161, 161,
                    [1.0, 1.0, 0.63332, 1.0, 0.31666, 0.15833, 0.9499799999999999, 0.63332, 0.31666]),
}


@pytest.mark.parametrize("name,target", list(PINNED))
def test_fitted_knobs_are_the_ones_the_family_chain_gave(name, target):
    g = {"tiny": TINY, "d30": D30}[name]
    cal = synthetic_calibration(g, seed=5, name=name)
    spec = PolicySpec(g, name, cal)
    policies = dict(paper_presets(model_config(name), cal))
    policies["ams_capped"] = AMSPolicy(n_condensed=1, window=2, window_demanding=3, theta_quantile=0.5,
                                       c_min=10, c_max=40)
    policies["budgets_cap"], policies["budgets_curve"] = _policies(g)[-1], _policies(g)[-2]
    fitted = {n: fit_to_memory(p, g, lambda q: memory_report(q, g, spec=spec).fraction <= target)
              for n, p in policies.items()}
    ams, ams_capped, fraction, cap, budgets_cap, curve = PINNED[(name, target)]
    assert (fitted["ams"].c_min, fitted["ams"].c_max) == ams
    assert (fitted["ams_capped"].c_min, fitted["ams_capped"].c_max) == ams_capped
    assert fitted["scalekv_10"].budget_fraction == fitted["scalekv_20"].budget_fraction == fraction
    for base in ("window", "sink_window"):
        for method in ("ams", "scalekv_10", "scalekv_20"):
            assert fitted[f"{base}@{method}"].max_tokens == cap
    assert fitted["budgets_cap"].max_tokens == budgets_cap
    assert list(fitted["budgets_curve"].scale_curve) == curve
    # only the knob moved
    for n, p in policies.items():
        changed = {k for k, v in fitted[n].params().items() if p.params()[k] != v}
        knobs = {"c_min", "c_max", "budget_fraction", "max_tokens", "scale_curve", "keep_fraction"}
        assert changed <= knobs, (n, changed)
