"""The evaluation cache key (plan_hash) tells per-head plans apart and leaves uniform plans' keys alone."""
from __future__ import annotations

from tests.policies.head_policies import HeadWindows
from tuner.geometry import CacheGeometry
from tuner.policies.base import PolicySpec
from tuner.search import trials
from tuner.search.trials import plan_hash

GEOM = CacheGeometry(num_layers=2, num_heads=2, head_dim=8, patch_nums=(1, 2, 3, 4))


def test_per_head_plans_with_equal_layer_maxima_get_different_keys():
    spec = PolicySpec(GEOM)
    # Heads alternate per layer, so both layers' max is the longer window's row either way.
    a = HeadWindows(windows=(1, 3), caps=(None, None))
    b = HeadWindows(windows=(2, 3), caps=(None, None))
    pa, pb = a.plan(spec), b.plan(spec)
    assert pa.head_budgets and pa.budgets == pb.budgets and pa.head_budgets != pb.head_budgets
    assert plan_hash(a, spec) != plan_hash(b, spec)


def test_uniform_plans_hash_without_a_head_table(monkeypatch):
    spec = PolicySpec(GEOM)
    policy = HeadWindows(windows=(3,), uniform=True)
    assert not policy.plan(spec).head_budgets
    seen = []
    monkeypatch.setattr(trials, "canonical_json", lambda doc: seen.append(doc) or "{}")
    plan_hash(policy, spec)
    assert "head_budgets" not in seen[0]
