"""Every registered family × every one of its conformance cases, on several model geometries.

The checks are functions so that a family registered by a test (tests/policies/test_new_family.py)
runs exactly the matrix's checks on its own cases.
"""
from __future__ import annotations

import pytest

from tests.policies.cases import FLAGS, build, case_ids, cases
from tests.policies.helpers import D30, SMALL, TINY, simulate, spec_for
from tuner.memory import memory_report
from tuner.policies.registry import family_names, make_policy, policy_class, registration

GEOMETRIES = {"small": SMALL, "tiny": TINY, "d30": D30}


def check_plan_is_valid_and_fits(family: str, index: int, geometry: str) -> None:
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
    if case.get("curve"):  # lists are sized to this geometry
        params = policy.params()
        sizes = (g.num_scales - 1, g.num_layers)
        assert any(isinstance(v, list) and len(v) in sizes for v in params.values())


def check_select_returns_exactly_the_budget(family: str, index: int, geometry: str) -> None:
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


def check_cases_are_well_formed(family: str) -> None:
    """Same number of cases on every geometry, only known flags, and the class names its family."""
    assert policy_class(family).family == family
    counts = {name: len(cases(family, g)) for name, g in GEOMETRIES.items()}
    assert len(set(counts.values())) == 1, f"{family}: the number of cases depends on the geometry: {counts}"
    assert all(set(c) <= {"params", *FLAGS} for c in cases(family, TINY))


def test_every_product_family_has_cases():
    # test-only families (e.g. the search tests' ``toy``) register from tests.* modules: not product families
    product = [f for f in family_names() if registration(f).product]
    assert set(product) >= {"full", "window", "sink_window", "ams", "scalekv", "budgets"}
    for family in product:
        assert cases(family, TINY), f"{family}: give its class a conformance_cases() (KVPolicy)"
        check_cases_are_well_formed(family)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("family,index", case_ids())
def test_plan_is_valid_and_fits(family, index, geometry):
    check_plan_is_valid_and_fits(family, index, geometry)


@pytest.mark.parametrize("geometry", ["small", "tiny"])
@pytest.mark.parametrize("family,index", case_ids())
def test_select_returns_exactly_the_budget(family, index, geometry):
    check_select_returns_exactly_the_budget(family, index, geometry)


@pytest.mark.parametrize("family", ["ams", "scalekv", "hack", "heatkv"])
def test_calibrated_families_refuse_to_plan_without_calibration(family):
    case = next(c for c in cases(family, TINY) if c.get("calibrated") and not c.get("keeps_all")
                and "n_drafters" not in c["params"])
    policy = make_policy(family, case["params"])
    with pytest.raises(ValueError, match="calibrat"):
        policy.plan(spec_for(TINY, calibrated=False))
