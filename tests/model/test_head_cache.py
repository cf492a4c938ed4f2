"""Per-head budgets in the cache and the planner: the plan's contract and errors, allocated bytes ==
planned bytes in every storage format (packed heads, no padding), and the selection checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from tests.policies.head_policies import HeadWindows
from tests.policies.helpers import SMALL, TINY
from tuner.memory import format_plan_table, memory_report
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, CachePlan, PolicySpec

# SMALL: 2 layers, 2 heads, head_dim 64, scales 1 4 9 16. Per head [layer][head] rows over the scales.
ROWS = [[(1, 5, 3, 0), (0, 4, 4, 0)], [(1, 2, 11, 0), (1, 0, 0, 0)]]


def test_from_head_rows_derives_the_layer_budgets_and_head_capacities():
    plan = CachePlan.from_head_rows(ROWS)
    assert plan.per_head
    assert plan.head_budgets == (((1, 0), (5, 4), (3, 4), (0, 0)), ((1, 1), (2, 0), (11, 0), (0, 0)))
    assert plan.budgets == ((1, 5, 4, 0), (1, 2, 11, 0))
    assert plan.head_capacities(0, 2) == (5, 4) and plan.head_capacities(1, 2) == (11, 1)
    assert plan.capacities() == (5, 11)  # each layer's largest head
    assert plan.capacity_vectors(0, 2) == 9 and plan.kept_vectors(1, 2, 2) == 11
    plan.validate(SMALL)
    uniform = CachePlan(((1, 5, 4, 0), (1, 2, 11, 0)))
    assert not uniform.per_head and uniform.head_capacities(1, 2) == (11, 11)
    assert uniform.capacity_vectors(1, 2) == 22 and uniform.head_budget(0, 1, 2) == (5, 5)


def _with(table):
    return dataclasses.replace(CachePlan.from_head_rows(ROWS), head_budgets=table)


@pytest.mark.parametrize("make,match", [
    (lambda: CachePlan.from_head_rows([[(1, 6, 3, 0), (0, 4, 4, 0)], ROWS[1]]),
     r"head_budgets\[0\]\[1\]\[0\] = 6 exceeds the 5 tokens"),
    (lambda: CachePlan.from_head_rows([[(1, 5, 3, 0), (0, 1, 11, 0)], ROWS[1]]),
     r"head_budgets\[0\]\[2\]\[1\] = 11 exceeds the 10 tokens"),  # its previous 1 + 9 new
    (lambda: CachePlan.from_head_rows([[(1, 5, 3, 0), (0, -1, 0, 0)], ROWS[1]]), "is negative"),
    (lambda: _with(CachePlan.from_head_rows(ROWS).head_budgets[:1]), "head_budgets has 1 layers"),
    (lambda: _with(tuple(t[:3] for t in CachePlan.from_head_rows(ROWS).head_budgets)), "has 3 scales"),
    (lambda: _with(tuple(tuple(h + (0,) for h in t) for t in CachePlan.from_head_rows(ROWS).head_budgets)),
     "has 3 heads"),
    (lambda: dataclasses.replace(CachePlan.from_head_rows(ROWS), budgets=((1, 5, 5, 0), (1, 2, 11, 0))),
     r"budget\[0\]\[2\] = 5 must be the largest head budget 4"),
    (lambda: _with((((1, 0), (5, 4.0), (3, 4), (0, 0)),) + CachePlan.from_head_rows(ROWS).head_budgets[1:]),
     "must be an integer"),
    (lambda: dataclasses.replace(CachePlan.from_head_rows(ROWS), full=True), "full layout"),
])
def test_bad_per_head_plans_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make().validate(SMALL)
    with pytest.raises(ValueError, match=match):
        memory_report(make(), SMALL)


def test_per_head_memory_by_hand():
    plan = CachePlan.from_head_rows(ROWS)
    r = memory_report(plan, SMALL, dtype="fp32", cfg=False)
    vec = 2 * 64 * 4  # one (token, head) vector, K and V, fp32, one row
    assert r.head_capacities == ((5, 4), (11, 1)) and r.capacities == (5, 11)
    assert r.kv_bytes_per_image == (5 + 4 + 11 + 1) * vec + 16 * 2 * vec  # + workspace of 16 tokens
    # uniform per-layer plan with the same largest heads: every head padded to the layer's largest
    padded = memory_report(CachePlan(plan.budgets), SMALL, dtype="fp32", cfg=False)
    assert padded.kv_bytes_per_image == (2 * 5 + 2 * 11) * vec + 16 * 2 * vec
    # resident while layer l attends at scale s: layers < l hold their new kept vectors, the rest
    # their old, plus the workspace with scale s (9 tokens, 2 heads). The peak of s=2 is while layer 0
    # attends: its old 5 + 4, layer 1's old 2 + 0 (layer 1 attending: layer 0's new 3 + 4, then 2 + 0)
    assert r.resident_bytes_per_scale[2] == (9 + 2 + 2 * 9) * vec
    int8 = memory_report(dataclasses.replace(plan, formats=("int8", "int4")), SMALL, dtype="fp16")
    assert int8.reference_kv_bytes_per_image == 2 * 2 * ((5 + 4) * 66 + (11 + 1) * 36 + 16 * 2 * 128)
    assert "| 1 | 12 | 11 | 1 |" in format_plan_table(r)


def test_equal_heads_cost_what_the_uniform_plan_costs():
    """A per-head plan with all heads alike has exactly the uniform plan's figures (every format)."""
    for fmt in ("compute", "int8", "int4"):
        per_head = HeadWindows(windows=(2,), caps=(20,), kv_format=fmt)
        uniform = HeadWindows(windows=(2,), caps=(20,), kv_format=fmt, uniform=True)
        a, b = (memory_report(p, TINY, dtype="fp16", batch=3) for p in (per_head, uniform))
        assert a.plan.per_head and not b.plan.per_head
        assert (a.kv_bytes_total, a.reference_kv_bytes_per_image, a.resident_bytes_per_scale, a.fraction) == \
            (b.kv_bytes_total, b.reference_kv_bytes_per_image, b.resident_bytes_per_scale, b.fraction)


@pytest.mark.parametrize("fmt", ["compute", "int8", "int4"])
@pytest.mark.parametrize("policy", [HeadWindows(windows=(1, 3), caps=(None, 0)),
                                    HeadWindows(windows=(4, 2), caps=(6, 11), rule="scores")],
                         ids=["zero-head", "scores"])
def test_allocated_bytes_equal_planned_bytes(small_model, policy, fmt):
    g = CacheGeometry.from_var_config(small_model.config.var)
    policy = dataclasses.replace(policy, kv_format=fmt)
    res = generate(small_model.var, small_model.vae, torch.tensor([1, 2, 3]), seed=0, policy=policy)
    report = memory_report(policy, g, dtype="fp32", batch=3)
    assert res.kv_bytes_allocated == report.kv_bytes_total
    caps = [report.plan.head_capacities(layer, g.num_heads) for layer in range(g.num_layers)]
    padded = CachePlan(report.plan.budgets, formats=report.plan.formats)
    uniform = memory_report(padded, g, dtype="fp32", batch=3)
    assert report.kv_bytes_total < uniform.kv_bytes_total  # packed: no padding to the largest head
    # ids: int32 per kept (row, token, head), plus one int32 [H + 1] offsets tensor per layer
    assert res.index_bytes_allocated == sum(6 * sum(c) * 4 + (g.num_heads + 1) * 4 for c in caps)


@dataclass(frozen=True)
class Answer(HeadWindows):
    """Returns a fixed mutation of the recent rule's per-head answer."""

    how: str = "ok"

    def select(self, state):
        idx = super().select(state).clone()
        k = state.head_budgets
        h = max(range(len(k)), key=lambda i: k[i])
        if self.how == "tail" and min(k) < max(k):  # garbage after a head's own entries: ignored
            idx[:, k.index(min(k)), min(k):] = 10_000
        elif self.how == "range":
            idx[:, h, k[h] - 1] = state.candidate_lens[h]
        elif self.how == "order" and k[h] > 1:
            idx[:, h, :2] = idx[:, h, :2].flip(-1)
        elif self.how == "shape":
            idx = idx[:, :, :-1]
        elif self.how == "shared":
            idx = idx[0, 0]
        return idx


@pytest.mark.parametrize("how,match", [("range", "outside a head's candidates"),
                                       ("order", "sorted ascending"), ("shape", "expected"),
                                       ("shared", "expected")])
def test_bad_per_head_selections_are_refused(small_model, how, match):
    with pytest.raises(ValueError, match=match):
        generate(small_model.var, small_model.vae, torch.tensor([1]), seed=0,
                 policy=Answer(windows=(4, 2), caps=(6, 3), how=how))


def test_the_tail_of_a_heads_answer_is_ignored(small_model):
    labels = torch.tensor([1, 4])
    ok, tail = (generate(small_model.var, small_model.vae, labels, seed=0,
                         policy=Answer(windows=(4, 2), caps=(6, 3), how=how)) for how in ("ok", "tail"))
    assert torch.equal(ok.images, tail.images)


def test_observer_sees_each_heads_candidates(small_model):
    seen = {}

    def observer(layer, scale, q, k_all, v_all, positions):
        seen[(layer, scale)] = positions.clone()

    policy = HeadWindows(windows=(1, 3), caps=(None, 0))
    generate(small_model.var, small_model.vae, torch.tensor([1]), seed=0, policy=policy, observer=observer)
    plan = policy.plan(PolicySpec(SMALL))
    pos = seen[(0, 2)]  # layer 0, scale 2: head 0 kept scale 1 (4 tokens), head 1 nothing
    assert plan.head_budgets[0][1] == (4, 0)
    assert pos[0, 0].tolist() == list(range(1, 5)) + list(range(5, 14))
    assert pos[0, 1].tolist() == list(range(5, 14)) + [-1] * 4
