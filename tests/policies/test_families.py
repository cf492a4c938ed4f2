"""Exact budgets and behaviour of each family (numbers worked out by hand in the comments)."""
from __future__ import annotations

import pytest

from tests.policies.helpers import D30, TINY, simulate, spec_for, synthetic_calibration
from tuner.memory import memory_report
from tuner.policies.ams import AMSPolicy
from tuner.policies.base import PolicySpec
from tuner.policies.budgets import BudgetsPolicy
from tuner.policies.registry import make_policy
from tuner.policies.scalekv import ScaleKVPolicy
from tuner.policies.sink_window import SinkWindowPolicy
from tuner.policies.window import WindowPolicy

# tiny: scale sizes 1 4 9 16 25 36 64, cumulative 1 5 14 30 55 91 155


def test_window_budgets_and_kept_tokens():
    spec = PolicySpec(TINY)
    assert WindowPolicy(2).plan(spec).budgets[0] == (1, 5, 13, 25, 41, 61, 0)
    assert WindowPolicy(2, max_tokens=20).plan(spec).budgets[3] == (1, 5, 13, 20, 20, 20, 0)
    assert WindowPolicy(1, max_tokens=1).plan(spec).budgets[0] == (1, 1, 1, 1, 1, 1, 0)
    kept = simulate(WindowPolicy(2, max_tokens=20), spec)
    assert kept[1][4][0, 0].tolist() == list(range(35, 55))  # the 20 most recent tokens after scale 4


def test_sink_window_keeps_sinks_then_recent():
    spec = PolicySpec(TINY)
    assert SinkWindowPolicy(1, 1).plan(spec).budgets[0] == (1, 5, 10, 17, 26, 37, 0)
    assert SinkWindowPolicy(2, 1, max_tokens=9).plan(spec).budgets[0] == (1, 5, 9, 9, 9, 9, 0)
    kept = simulate(SinkWindowPolicy(2, 1, max_tokens=9), spec)
    assert kept[0][5][1, 2].tolist() == [0, 1, 2, 3, 4, 87, 88, 89, 90]
    kept = simulate(SinkWindowPolicy(3, 1, max_tokens=2), spec)  # cap below the sinks: first sinks only
    assert kept[0][5][0, 0].tolist() == [0, 1]


def test_ams_demanding_layers_by_quantile_and_theta():
    cal = synthetic_calibration(TINY, seed=3)
    sims = cal.layer_similarity()
    spec = PolicySpec(TINY, "t", cal)
    lowest3 = sorted(range(6), key=lambda i: sims[i])[:3]
    pol = AMSPolicy(n_condensed=2, window=1, window_demanding=2, theta_quantile=0.5)
    assert [i for i, d in enumerate(pol.demanding_layers(spec)) if d] == sorted(lowest3)
    plan = pol.plan(spec)
    for layer in range(6):
        # condensed 1+4, then: demanding keep 2 last scales, efficient 1
        want = (1, 5, 14, 30, 46, 66, 0) if layer in lowest3 else (1, 5, 14, 21, 30, 41, 0)
        assert plan.budgets[layer] == want
    theta = sorted(sims)[2]  # strictly below: the two lowest
    by_theta = AMSPolicy(window=1, window_demanding=2, theta=theta).demanding_layers(spec)
    assert sum(by_theta) == 2 and all(by_theta[i] for i in sorted(range(6), key=lambda i: sims[i])[:2])
    kept = simulate(pol, spec)
    efficient = next(i for i in range(6) if i not in lowest3)
    assert kept[efficient][5][0, 0].tolist() == [0, 1, 2, 3, 4] + list(range(55, 91))


def test_ams_caps_and_default_preset_memory_on_d30():
    cal = synthetic_calibration(D30, seed=1)
    spec = PolicySpec(D30, "d30", cal)
    pol = AMSPolicy(n_condensed=2, window=1, window_demanding=2, theta_quantile=0.25)
    report = memory_report(pol, D30, dtype="fp16", spec=spec)
    # 8 demanding layers keep 5+100+169 = 274, 22 efficient 5+169 = 174, workspace 256 tokens;
    # 15,360 B per token (2 × 30 heads × 64 × 2 B × 2 rows)
    assert sorted(report.capacities) == [174] * 22 + [274] * 8
    assert report.kv_bytes_per_image == (22 * 174 + 8 * 274 + 256) * 15360 == 96_399_360
    assert report.fraction == pytest.approx(6276 / 20400)
    capped = AMSPolicy(window=1, window_demanding=2, c_min=100, c_max=200).plan(spec)
    assert sorted(set(max(r) for r in capped.budgets)) == [100, 200]


def test_ams_without_calibration():
    assert AMSPolicy(window=2, window_demanding=2).plan(PolicySpec(TINY)).budgets[0][-2] == 5 + 25 + 36
    with pytest.raises(ValueError, match="tuner calibrate"):
        AMSPolicy().plan(PolicySpec(TINY))


@pytest.mark.parametrize("seed", range(5))
def test_scalekv_per_scale_sum_is_uniform_budget_times_layers(seed):
    spec = spec_for(D30, seed=seed)
    pol = ScaleKVPolicy(budget_fraction=0.10)
    plan = pol.plan(spec)
    assert pol.uniform_budget(spec) == 42  # round(0.1 × 424)
    assert pol.compressed_scales(spec) == [4, 5, 6, 7, 8]
    assert pol.drafter_count(spec) == 9  # round(150 / 16)
    for s in range(4):
        assert {row[s] for row in plan.budgets} == {D30.tokens_through(s)}
    for s in range(4, 9):
        assert sum(row[s] for row in plan.budgets) == 42 * 30
    z = spec.calibration.asi_z()
    ranked = sorted((z[layer][s + 1], s, layer) for s in range(4, 9) for layer in range(30))
    drafters = {(layer, s) for _, s, layer in ranked[:9]}
    assert pol.drafters(spec) == drafters
    layer, s = sorted(drafters, key=lambda p: p[1])[0]
    avail = (plan.budgets[layer][s - 1] if s else 0) + D30.scale_lengths[s]
    assert plan.budgets[layer][s] == int(0.99 * avail)


def test_scalekv_refiners_keep_their_window_when_drafters_are_greedy():
    spec = spec_for(TINY)
    greedy = ScaleKVPolicy(budget_fraction=0.2, n_drafters=3 * 6 - 1, drafter_budget=1.0, window_size=4)
    plan = greedy.plan(spec)
    u = round(0.2 * 91)  # 18
    for s in (3, 4, 5):
        col = [row[s] for row in plan.budgets]
        assert sum(col) == u * 6
    assert min(row[5] for row in plan.budgets) >= 4


def test_scalekv_uniform_is_snapkv_without_calibration():
    plan = ScaleKVPolicy(budget_fraction=0.2, n_drafters=0).plan(PolicySpec(TINY))
    assert plan.budgets[0] == (1, 5, 14, 18, 18, 18, 0)


def test_scalekv_keeps_window_tokens():
    spec = spec_for(TINY)
    pol = ScaleKVPolicy(budget_fraction=0.2, n_drafters=0, window_size=16)
    kept = simulate(pol, spec)
    # after scale 5 (6×6 map, 4×4 grid with cell 1 → rows/cols 0..3), the window tokens are kept
    window = {55 + r * 6 + c for r in range(4) for c in range(4)}
    for layer in range(6):
        for row in kept[layer][5].reshape(-1, 18).tolist():
            assert window <= set(row)


def test_budgets_curve_weights_and_table():
    spec = PolicySpec(TINY)
    assert BudgetsPolicy(scale_curve=(0.5,) * 6).plan(spec).budgets[0] == (1, 3, 7, 15, 28, 46, 0)
    plan = BudgetsPolicy(scale_curve=(1.0,) * 6, layer_weights=(1, 1, 1, 1, 0, 2)).plan(spec)
    assert plan.budgets[4] == (0,) * 7  # weight 0
    assert plan.budgets[0] == (1, 5, 14, 30, 55, 91, 0)  # mean weight 1: weight 1 keeps T_s
    assert plan.budgets[5] == plan.budgets[0]  # weight 2 is clipped to what exists
    table = tuple((1, 5, 10, 10, 10, 10, 0) for _ in range(6))
    assert BudgetsPolicy(table=table).plan(spec).budgets == table
    with pytest.raises(ValueError, match="exceeds"):
        BudgetsPolicy(table=((1, 5, 14, 40, 10, 10, 0),) * 6).plan(spec)
    with pytest.raises(ValueError, match="scale_curve has 3 values"):
        BudgetsPolicy(scale_curve=(1.0, 1.0, 1.0)).plan(spec)


@pytest.mark.parametrize("family,params,match", [
    ("window", {"window": 0}, "window must be an integer >= 1"),
    ("window", {"max_tokens": 0}, "max_tokens"),
    ("sink_window", {"sink_scales": 1.5}, "sink_scales"),
    ("ams", {"window": 3, "window_demanding": 2}, "window_demanding"),
    ("ams", {"theta": -1.0, "theta_quantile": 0.3}, "not both"),
    ("ams", {"theta_quantile": 1.5}, "theta_quantile"),
    ("ams", {"c_min": 50, "c_max": 10}, "c_max"),
    ("scalekv", {"budget_fraction": 0.0}, "budget_fraction"),
    ("scalekv", {"n_drafters": 2, "drafter_fraction": 0.1}, "not both"),
    ("scalekv", {"pool_kernel": 4}, "pool_kernel"),
    ("budgets", {}, "exactly one"),
    ("budgets", {"scale_curve": [1.2]}, r"\[0, 1\]"),
    ("budgets", {"scale_curve": [1.0], "rule": "oldest"}, "rule"),
    ("budgets", {"table": [[1, 2]], "layer_weights": [1.0]}, "layer_weights"),
])
def test_invalid_params_raise_value_error(family, params, match):
    with pytest.raises(ValueError, match=match):
        make_policy(family, params)


def test_params_round_trip_through_registry():
    pol = make_policy("budgets", {"table": [[1, 5, 0]], "rule": "sink_recent"})
    assert pol.table == ((1, 5, 0),)
    again = make_policy("budgets", pol.params())
    assert again == pol and hash(again) == hash(pol)


def test_scalekv_drafters_gain_even_when_the_budget_is_below_the_window():
    # tiny at 10%: U = 9 tokens < 16 window tokens; refiners keep at least 4 (U // 2), drafters the rest
    spec = spec_for(TINY)
    pol = ScaleKVPolicy(budget_fraction=0.10, n_drafters=2)
    plan = pol.plan(spec)
    drafters = pol.drafters(spec)
    s = min(s for _, s in drafters)
    col = [row[s] for row in plan.budgets]
    assert sum(col) == 9 * 6
    assert max(col) > 9 and min(col) >= 4


def test_window_zero_is_rejected():
    import pytest

    from tuner.policies.registry import make_policy

    for family in ("window", "sink_window"):
        with pytest.raises(ValueError, match="window"):
            make_policy(family, {"window": 0})
