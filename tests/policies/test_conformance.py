"""Every registered family × every case of tests/policies/cases.py, on several model geometries."""
from __future__ import annotations

import pytest

from tests.policies.cases import CASES, case_ids, concrete_params
from tests.policies.helpers import D30, SMALL, TINY, simulate, spec_for
from tuner.memory import memory_report
from tuner.policies.registry import family_names, make_policy

GEOMETRIES = {"small": SMALL, "tiny": TINY, "d30": D30}


def build(family: str, index: int, g):
    case = CASES[family][index]
    return make_policy(family, concrete_params(case, g.num_layers, g.num_scales)), case


def test_every_registered_family_has_cases():
    from tuner.policies import registry

    # test-only families (e.g. the search tests' ``toy``) register from tests.* modules: not product families
    product = {f for f in family_names() if registry._FAMILIES[f].startswith("tuner.")}
    assert product <= set(CASES), "add the new family to tests/policies/cases.py"


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("family,index", case_ids())
def test_plan_is_valid_and_fits(family, index, geometry):
    g = GEOMETRIES[geometry]
    policy, case = build(family, index, g)
    spec = spec_for(g, calibrated=case.get("calibrated", False))
    plan = policy.plan(spec)
    plan.validate(g)
    assert plan == policy.plan(spec), "plan must be deterministic"
    if not plan.full:
        assert all(row[-1] == 0 for row in plan.budgets), "nothing reads the last scale"
    report = memory_report(policy, g, dtype="fp16", spec=spec)
    assert 0 < report.fraction <= 1.0 + 1e-12
    if case.get("keeps_all") and not plan.full:
        for row in plan.budgets:
            assert list(row[:-1]) == [g.tokens_through(s) for s in range(g.num_scales - 1)]


@pytest.mark.parametrize("geometry", ["small", "tiny"])
@pytest.mark.parametrize("family,index", case_ids())
def test_select_returns_exactly_the_budget(family, index, geometry):
    g = GEOMETRIES[geometry]
    policy, case = build(family, index, g)
    spec = spec_for(g, calibrated=case.get("calibrated", False))
    plan = policy.plan(spec)
    kept = simulate(policy, spec)
    for layer in range(g.num_layers):
        for s in range(g.num_scales):
            pos = kept[layer][s]
            assert pos.shape[-1] == plan.budgets[layer][s]
            if pos.shape[-1]:
                # kept tokens exist by then, are unique and stay in position order
                assert int(pos.max()) < g.tokens_through(s)
                assert bool((pos[..., 1:] > pos[..., :-1]).all())


@pytest.mark.parametrize("family", ["ams", "scalekv"])
def test_calibrated_families_refuse_to_plan_without_calibration(family):
    case = next(c for c in CASES[family] if c.get("calibrated") and not c.get("keeps_all")
                and "n_drafters" not in c["params"])
    policy = make_policy(family, concrete_params(case, TINY.num_layers, TINY.num_scales))
    with pytest.raises(ValueError, match="calibrat"):
        policy.plan(spec_for(TINY, calibrated=False))
