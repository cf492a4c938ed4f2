"""``scalekv``: ScaleKV (arXiv 2505.19602) drafter/refiner budgets and observation-window selection.

Follows the released code where it and the paper differ (StargazerX0/ScaleKV), except that
scores use the true softmax attention of the real queries (the "clean version" of §1.6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tuner.policies.base import (CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState,
                                 cached_before_last)
from tuner.policies.selection import (check_fraction, check_int, check_pool_kernel, round_half_up,
                                      rule_description, score_indices, share_budget)

DEFAULT_DRAFTER_FRACTION = 1 / 16


@dataclass(frozen=True)
class ScaleKVPolicy(KVPolicy):
    """ScaleKV: a few (layer, scale) pairs are drafters with a near-full cache, refiners share the rest.

    Budgets (static):

    - ``budget_fraction``: the uniform-equivalent budget ``U = round(f · T)`` tokens per layer, with
      ``T`` the tokens cached before the last scale (ScaleKV's reference: 10% of 6425 = 650 on
      Infinity; 10% of 424 = 42 on VAR 256px). Scales whose cumulative length is ``<= U`` keep
      everything (the released code's start gate); every later scale ``s`` (except the last, whose
      budget is 0) is *compressed*.
    - Roles: the ASI of the scale that reads the cache (``s+1``) is z-normalised over layers per
      scale (:meth:`tuner.calibration.Calibration.asi_z`); all (layer, compressed scale) pairs are
      ranked jointly and the ``n_drafters`` lowest are drafters (ties by scale, then layer).
      ``n_drafters`` or ``drafter_fraction`` (of those pairs) may be given, not both; neither means
      ``drafter_fraction = 1/16`` (the released tables: 2 of 32 and 3 of 40 layers). ``n_drafters``
      larger than the number of pairs is clipped.
    - A drafter keeps ``floor(drafter_budget · candidates)`` of its candidates (the released tables
      keep all but ~0.3%). Refiners share the rest so that every compressed scale holds exactly
      ``U · num_layers`` tokens (the released-code invariant), as evenly as possible, each at most
      its candidates. Refiners are guaranteed ``min(window_size, max(1, U // 2))`` tokens (the
      observation window, but never more than half the uniform budget, so drafters still gain when
      ``U`` is small): drafters are cut back when they would take more than that leaves.

    Selection (per row and head, at every compressed scale): ``window_size`` queries of the current
    scale spread on a grid (all of them for small maps) score the candidates by softmax attention
    mass, 1-D max-pooled with ``pool_kernel``; the window's tokens are always kept and the rest is the
    top-scored candidates. ``n_drafters = 0`` is uniform SnapKV-style compression (no calibration).
    """

    budget_fraction: float = 0.10
    n_drafters: int | None = None
    drafter_fraction: float | None = None
    drafter_budget: float = 0.99
    window_size: int = 16
    pool_kernel: int = 5

    family = "scalekv"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_fraction("budget_fraction", self.budget_fraction)
        check_int("n_drafters", self.n_drafters, 0, allow_none=True)
        check_fraction("drafter_fraction", self.drafter_fraction, low_open=False, allow_none=True)
        if self.n_drafters is not None and self.drafter_fraction is not None:
            raise ValueError("give n_drafters or drafter_fraction, not both")
        check_fraction("drafter_budget", self.drafter_budget)
        check_int("window_size", self.window_size, 1)
        check_pool_kernel(self.pool_kernel)

    def uniform_budget(self, spec: PolicySpec) -> int:
        """``U``: uniform-equivalent tokens per layer."""
        g = spec.geometry
        return round_half_up(self.budget_fraction * g.tokens_through(g.num_scales - 2))

    def compressed_scales(self, spec: PolicySpec) -> list[int]:
        g, u = spec.geometry, self.uniform_budget(spec)
        return [s for s in range(g.num_scales - 1) if g.tokens_through(s) > u]

    def drafter_count(self, spec: PolicySpec) -> int:
        pairs = spec.geometry.num_layers * len(self.compressed_scales(spec))
        if self.n_drafters is not None:
            return min(self.n_drafters, pairs)
        frac = DEFAULT_DRAFTER_FRACTION if self.drafter_fraction is None else self.drafter_fraction
        return min(pairs, round_half_up(frac * pairs))

    def drafters(self, spec: PolicySpec) -> frozenset[tuple[int, int]]:
        """The drafter (layer, scale) pairs; ``scale`` is the scale after which the budget applies."""
        count = self.drafter_count(spec)
        if count == 0:
            return frozenset()
        cal = spec.calibration
        if cal is None:
            raise ValueError("the scalekv policy needs calibration statistics (attention selectivity index "
                             "per layer and scale); run `tuner calibrate` for this model, or use "
                             "n_drafters=0")
        z = cal.asi_z()
        g = spec.geometry
        if len(z) != g.num_layers or any(len(row) != g.num_scales for row in z):
            raise ValueError("calibration does not match the model's layers and scales")
        ranked = sorted(((z[layer][s + 1], s, layer) for s in self.compressed_scales(spec)
                         for layer in range(g.num_layers)))
        return frozenset((layer, s) for _, s, layer in ranked[:count])

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        n_layers, u = g.num_layers, self.uniform_budget(spec)
        compressed = set(self.compressed_scales(spec))
        drafters = self.drafters(spec)
        floor_ref = min(self.window_size, max(1, u // 2))
        rows: list[list[int]] = [[] for _ in range(n_layers)]
        prev = [0] * n_layers
        for s in range(g.num_scales - 1):
            avail = [p + g.scale_lengths[s] for p in prev]
            if s not in compressed:
                budgets = avail
            else:
                d_layers = [layer for layer in range(n_layers) if (layer, s) in drafters]
                r_layers = [layer for layer in range(n_layers) if (layer, s) not in drafters]
                total = u * n_layers
                reserved = sum(min(avail[layer], floor_ref) for layer in r_layers)
                d_caps = [math.floor(self.drafter_budget * avail[layer]) for layer in d_layers]
                d_share = share_budget(min(sum(d_caps), max(0, total - reserved)), d_caps)
                r_share = share_budget(total - sum(d_share), [avail[layer] for layer in r_layers])
                budgets = [0] * n_layers
                for layer, b in zip(d_layers + r_layers, d_share + r_share):
                    budgets[layer] = b
            for layer in range(n_layers):
                rows[layer].append(budgets[layer])
            prev = budgets
        return CachePlan(tuple(tuple(row) + (0,) for row in rows))

    def select(self, state: SelectionState):
        return score_indices(state, self.window_size, self.pool_kernel)

    def selection(self, geometry) -> dict:
        return rule_description("scores", window_size=self.window_size, pool_kernel=self.pool_kernel)

    def memory_knob(self, geometry) -> MemoryKnob:
        """``budget_fraction`` from half a token per layer (``U`` rounds to 0 below it) to 1."""
        return MemoryKnob(0.5 / cached_before_last(geometry), 1.0, False,
                          lambda v: replace(self, budget_fraction=float(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"budget_fraction": 1.0}, "keeps_all": True, "calibrated": True},
            {"params": {"budget_fraction": 0.3}, "calibrated": True},
            {"params": {"budget_fraction": 0.2, "n_drafters": 3, "window_size": 4}, "calibrated": True},
            {"params": {"budget_fraction": 0.05, "drafter_fraction": 0.5, "drafter_budget": 0.5,
                        "pool_kernel": 0}, "calibrated": True},
            {"params": {"budget_fraction": 0.1, "n_drafters": 0}},
        ]
