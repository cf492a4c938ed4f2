"""``hack``: HACK (Qin et al., arXiv 2504.09261, AAAI-26) head-aware asymmetric budgets.

HACK splits the heads offline into *contextual* heads (vertical attention patterns: every query reads
the same few keys of earlier scales) and *structural* heads (multi-diagonal patterns: each query reads
its spatial neighbours in earlier scales), gives contextual heads a small budget ``B_C`` and structural
heads a large one ``B_S`` (the paper: contextual heads tolerate ~90% compression, structural ones
degrade past ~50%), and selects differently in each group. Facts are from the paper's abstracts and
summaries (reference/methods.md §3, §7): its code was not read, so the defaults below are ours where
the paper's values were not recoverable, and say so.

Not implemented: the soft merge of evicted keys into kept ones at the last step (LOOK-M style); it
changes values, not memory, and our engine keeps every kept K/V exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tuner.policies.base import (CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState,
                                 cached_before_last)
from tuner.policies.selection import (check_fraction, check_int, check_pool_kernel, clip_row, round_half_up,
                                      top_per_head, window_scores)


@dataclass(frozen=True)
class HACKPolicy(KVPolicy):
    """Contextual heads keep ``B_C`` tokens chosen by sampled-query attention; structural heads keep
    ``B_S`` tokens: the initial scales, the newest scale, then the best-scored of the rest.

    - ``contextual_fraction`` ``α``: the share of all heads that are contextual, the heads of highest
      calibrated dispersion ranked over all layers together (HACK ranks heads globally; its
      criterion is the attention map's column variance, ours the dispersion of
      :mod:`tuner.calibration_heads`, which measures the same vertical-vs-diagonal difference).
      Default 0.5 (ours: the paper's α was not recoverable).
    - ``budget_fraction`` ``f``: the mean budget per head, ``U = f · T`` tokens with ``T`` the tokens
      cached before the last scale (ScaleKV's reference), so ``α·B_C + (1 − α)·B_S = U``.
      Default 0.3 (HACK's 70% compression, near-lossless on Infinity).
    - ``contextual_ratio`` ``r = B_C / B_S`` in ``[0, 1)``. Default 0.2 (ours, from the tolerances
      above: ~10% of the cache for contextual heads, ~50% for structural ones). ``B_C`` is kept
      below ``B_S`` so that the group of a head that must choose follows from its budget.
    - ``sink_scales``: initial scales structural heads always keep (the summaries: the first two).
    - ``window_size``: sampled queries of the current scale that score the candidates (a grid, as
      ScaleKV's observation window; HACK samples ~32 uniformly); ``pool_kernel``: 1-D max-pooling
      of the scores (ours).

    A head keeps ``min(B, candidates)`` after each scale but the last (0 there).
    """

    budget_fraction: float = 0.3
    contextual_fraction: float = 0.5
    contextual_ratio: float = 0.2
    sink_scales: int = 2
    window_size: int = 32
    pool_kernel: int = 5

    family = "hack"
    needs_calibration = True
    needs_head_calibration = True

    def __post_init__(self) -> None:
        check_fraction("budget_fraction", self.budget_fraction)
        check_fraction("contextual_fraction", self.contextual_fraction, low_open=False)
        if isinstance(self.contextual_ratio, bool) or not isinstance(self.contextual_ratio, (int, float)) \
                or not 0.0 <= self.contextual_ratio < 1.0:
            raise ValueError(f"contextual_ratio must be in [0, 1), got {self.contextual_ratio!r}")
        check_int("sink_scales", self.sink_scales, 0)
        check_int("window_size", self.window_size, 1)
        check_pool_kernel(self.pool_kernel)

    def contextual_count(self, geometry) -> int:
        """Contextual heads over the whole model."""
        return math.floor(self.contextual_fraction * geometry.num_layers * geometry.num_heads + 0.5)

    def group_budgets(self, geometry) -> tuple[int, int]:
        """``(B_C, B_S)`` tokens per head (``B_C < B_S`` whenever ``B_S > 0``)."""
        total = geometry.num_layers * geometry.num_heads
        alpha = self.contextual_count(geometry) / total
        u = self.budget_fraction * cached_before_last(geometry)
        b_s = round_half_up(u / (alpha * self.contextual_ratio + 1.0 - alpha))
        b_c = min(round_half_up(self.contextual_ratio * b_s), max(0, b_s - 1))
        return b_c, b_s

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        share = self.contextual_count(g) / (g.num_layers * g.num_heads)
        contextual = spec.head_calibration().contextual(share)
        b_c, b_s = self.group_budgets(g)

        def row(budget: int) -> tuple[int, ...]:
            return clip_row(g, [min(budget, g.tokens_through(s)) for s in range(g.num_scales - 1)] + [0])

        rows = {b_c: row(b_c), b_s: row(b_s)}
        return CachePlan.from_head_rows([[rows[b_c if contextual[layer][h] else b_s]
                                          for h in range(g.num_heads)] for layer in range(g.num_layers)])

    def select(self, state: SelectionState):
        """Per head by group. A head that must choose keeps exactly its group's budget (its row is
        ``min(B, candidates)``), so ``k_h == B_C`` names a contextual head."""
        import torch

        b_c, _ = self.group_budgets(state.geometry)
        scores, _ = window_scores(state, self.window_size, self.pool_kernel)
        r, h, n = scores.shape
        k = torch.tensor(state.head_budgets or (state.budget,) * h, device=scores.device)
        lens = torch.tensor(state.candidate_lens, device=scores.device)
        structural = ~((k == b_c) & (k < lens))  # [H]
        # Structural heads: the sinks first, then the newest scale, then the scores (masses <= lift).
        pos = state.positions
        sinks = (pos >= 0) & (pos < state.geometry.tokens_through(self.sink_scales - 1)) \
            if self.sink_scales else torch.zeros_like(pos, dtype=torch.bool)
        newest = pos >= state.geometry.scale_starts[state.scale]
        lift = scores.masked_fill(pos < 0, 0.0).amax(dim=-1, keepdim=True) + 1.0
        bonus = (2.0 * sinks.float() + newest.float()) * lift
        scores = torch.where(structural.view(1, -1, 1), scores + bonus, scores)
        return top_per_head(state, scores)

    def selection(self, geometry) -> dict[str, Any]:
        return {"family": self.family, "sink_tokens": geometry.tokens_through(self.sink_scales - 1)
                if self.sink_scales else 0, "window_size": self.window_size, "pool_kernel": self.pool_kernel,
                "contextual_budget": self.group_budgets(geometry)[0]}

    def memory_knob(self, geometry) -> MemoryKnob:
        """``budget_fraction`` from half a token per head to 1 (the group split stays)."""
        return MemoryKnob(0.5 / cached_before_last(geometry), 1.0, False,
                          lambda v: replace(self, budget_fraction=float(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"budget_fraction": 1.0, "contextual_ratio": 0.99}, "calibrated": True},
            {"params": {"budget_fraction": 0.3}, "calibrated": True},
            {"params": {"budget_fraction": 0.2, "contextual_fraction": 0.25, "window_size": 4},
             "calibrated": True},
            {"params": {"budget_fraction": 0.1, "contextual_ratio": 0.0, "sink_scales": 1, "pool_kernel": 0},
             "calibrated": True},
            {"params": {"budget_fraction": 0.15, "contextual_fraction": 1.0, "sink_scales": 0},
             "calibrated": True},
        ]
