"""Fitting a policy's budget knob to a memory target (tuner.policies.fit)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.policies.helpers import D30, TINY, spec_for
from tuner.memory import memory_report
from tuner.policies.ams import AMSPolicy
from tuner.policies.budgets import BudgetsPolicy
from tuner.policies.fit import fit_to_memory, memory_knob
from tuner.policies.full import FullPolicy
from tuner.policies.scalekv import ScaleKVPolicy
from tuner.policies.sink_window import SinkWindowPolicy
from tuner.policies.window import WindowPolicy


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
            assert got > target - 2 * per_layer_token * g.num_scales or fraction(knob.apply(knob.high)) <= target
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
