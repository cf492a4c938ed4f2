"""KV cache: allocated bytes equal the plan's, selection paths, and bit-identity at full budget."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tuner.model.generate import generate
from tuner.policies.base import CachePlan, CacheGeometry, KVPolicy, PolicySpec


@dataclass(frozen=True)
class RecentTokens(KVPolicy):
    """Test policy: keep the ``budget`` most recent tokens (per_head: a different choice per head)."""

    budget: int = 10_000
    per_head: bool = False
    family = "test-recent"

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        rows = []
        for _ in range(g.num_layers):
            row, prev = [], 0
            for s in range(g.num_scales):
                b = 0 if s == g.num_scales - 1 else min(self.budget, prev + g.scale_lengths[s])
                row.append(b)
                prev = b
            rows.append(tuple(row))
        return CachePlan(tuple(rows))

    def select(self, state):
        n, k = state.n_candidates, state.budget
        if not self.per_head:
            return torch.arange(n - k, n)
        r, h = state.positions.shape[:2]
        # head j keeps the most recent k tokens but swaps the oldest kept one for token j (if older)
        idx = torch.arange(n - k, n).repeat(r, h, 1)
        for j in range(h):
            if j < n - k:
                idx[:, j, 0] = j
        return idx.sort(dim=-1).values


def bytes_per_token(geometry: CacheGeometry, rows: int, dtype=torch.float32) -> int:
    return 2 * geometry.num_heads * geometry.head_dim * torch.finfo(dtype).bits // 8 * rows


def test_full_cache_bytes_match_official_layout(small_model):
    g = CacheGeometry.from_var_config(small_model.config.var)
    res = generate(small_model.var, small_model.vae, torch.tensor([1, 2, 3]), seed=0)
    assert res.kv_bytes_allocated == g.seq_len * g.num_layers * bytes_per_token(g, rows=6)
    assert res.index_bytes_allocated == 0


@pytest.mark.parametrize("budget,per_head", [(3, False), (7, False), (7, True), (12, True)])
def test_allocated_bytes_equal_planned_bytes(small_model, budget, per_head):
    g = CacheGeometry.from_var_config(small_model.config.var)
    policy = RecentTokens(budget, per_head)
    plan = policy.plan(PolicySpec(g))
    res = generate(small_model.var, small_model.vae, torch.tensor([1, 2]), seed=0, policy=policy)
    planned_tokens = sum(plan.capacities()) + max(g.scale_lengths)
    assert res.kv_bytes_allocated == planned_tokens * bytes_per_token(g, rows=4)


def test_budget_at_least_full_is_bit_identical_to_full(small_model):
    labels = torch.tensor([0, 5, 9])
    full = generate(small_model.var, small_model.vae, labels, seed=3)
    everything = generate(small_model.var, small_model.vae, labels, seed=3, policy=RecentTokens(10_000))
    assert torch.equal(full.images, everything.images)
    assert all(torch.equal(a, b) for a, b in zip(full.tokens, everything.tokens))


def test_smaller_budget_changes_images(small_model):
    labels = torch.tensor([0, 5, 9])
    full = generate(small_model.var, small_model.vae, labels, seed=3, top_k=0, top_p=0.0)
    small = generate(small_model.var, small_model.vae, labels, seed=3, top_k=0, top_p=0.0,
                     policy=RecentTokens(2))
    assert not torch.equal(full.images, small.images)


def test_per_head_selection_is_respected(small_model):
    """With per-head choices, each head's attention really sees its own kept tokens."""
    seen = []

    def observer(layer, scale, q, k_all, v_all, positions):
        if layer == 0 and scale == 2:
            seen.append(positions.clone())

    labels = torch.tensor([1])
    generate(small_model.var, small_model.vae, labels, seed=0, policy=RecentTokens(4, per_head=True),
             observer=observer)
    pos = seen[0]  # [rows, heads, n_old + n_new]: kept after scale 1, then scale 2's tokens
    assert pos.shape[-1] == 4 + 9
    assert not torch.equal(pos[:, 0], pos[:, 1])  # heads kept different tokens


def test_bad_selection_is_rejected(small_model):
    @dataclass(frozen=True)
    class Broken(RecentTokens):
        def select(self, state):
            return torch.zeros(state.budget, dtype=torch.long)  # duplicates

    with pytest.raises(ValueError, match="unique"):
        generate(small_model.var, small_model.vae, torch.tensor([1]), seed=0, policy=Broken(3))
