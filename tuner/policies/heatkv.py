"""``heatkv``: HeatKV (Cederlund et al., arXiv 2605.14877; code arm-research/heatkv) static
(layer, head, source-scale) pruning by calibrated attention mass.

Facts from the released code (commit 96dc288: ``tools/compute_scas.py``, ``enable_pruning.py``):
every *atom* ``(layer, head, source scale j)`` gets the S-CAS score, the mean over the later query
scales of the attention mass their queries put on scale ``j``; the initial scales are protected
(Infinity: scales 0-3 of 13, 57 of 6,425 cached tokens, under 1%); the last scale is never cached;
the remaining atoms are sorted ascending and pruned until the kept fraction meets the budget; a
pruned atom's tokens are dropped from that head's cache (a ragged per-head layout). Our S-CAS averages
both CFG rows (the released code reads the conditional row only), see
:mod:`tuner.calibration_head_summary`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import check_fraction, check_int

COUNTS = ("atoms", "tokens")
# Protect the initial scales holding at most this share of the cached tokens (HeatKV's 4 of 13 scales
# are 0.9% of Infinity's 6,425), at least scale 0: on VAR 256px that is scale 0, on tiny scale 0.
PROTECTED_SHARE = 0.01


@dataclass(frozen=True)
class HeatKVPolicy(KVPolicy):
    """Keep whole source scales per (layer, head): the protected initial scales, then the atoms with
    the highest S-CAS until ``keep_fraction`` of the prunable atoms is kept.

    - ``keep_fraction`` in ``[0, 1]``: share of the prunable atoms (every (layer, head, scale) with a
      scale after the protected ones and before the last) that is kept, ranked globally by S-CAS
      (ties by layer, head, scale). ``count="tokens"`` measures the share in tokens instead of atoms
      (an atom of a large scale then costs what it holds; not HeatKV's rule, our variant).
    - ``protected_scales``: initial scales every head keeps; ``None`` = the most whose tokens stay
      within 1% of the tokens cached before the last scale (at least 1), as HeatKV's 4 of 13 on
      Infinity.

    Head ``h`` of layer ``l`` keeps, after scale ``s``, every token of its kept scales ``<= s``
    (nothing after the last scale). The plan is per head (``CachePlan.head_budgets``); the tokens a
    head keeps follow from its plan alone, so :meth:`select` keeps each head's old tokens and, when the
    scale is kept, the scale's own.
    """

    keep_fraction: float = 0.5
    protected_scales: int | None = None
    count: str = "atoms"

    family = "heatkv"
    needs_calibration = True
    needs_head_calibration = True

    def __post_init__(self) -> None:
        check_fraction("keep_fraction", self.keep_fraction, low_open=False)
        check_int("protected_scales", self.protected_scales, 1, allow_none=True)
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {', '.join(COUNTS)}, got {self.count!r}")

    def protected(self, spec: PolicySpec) -> int:
        """Initial scales every head keeps (at most all scales but the last)."""
        g = spec.geometry
        if self.protected_scales is not None:
            return min(self.protected_scales, g.num_scales - 1)
        limit = PROTECTED_SHARE * g.tokens_through(g.num_scales - 2)
        return max(1, max((p for p in range(1, g.num_scales) if g.tokens_through(p - 1) <= limit), default=1))

    def kept_atoms(self, spec: PolicySpec) -> frozenset[tuple[int, int, int]]:
        """The kept prunable atoms ``(layer, head, scale)``."""
        g, heads = spec.geometry, spec.head_calibration()
        first, last = self.protected(spec), g.num_scales - 1
        ranked = sorted(((-_score(heads.scas[layer][h][j]), layer, h, j) for layer in range(g.num_layers)
                         for h in range(g.num_heads) for j in range(first, last)))
        if self.count == "atoms":
            keep = math.floor(self.keep_fraction * len(ranked) + 0.5)
            return frozenset((layer, h, j) for _, layer, h, j in ranked[:keep])
        total = sum(g.scale_lengths[j] for *_, j in ranked)
        chosen, held = set(), 0
        for _, layer, h, j in ranked:  # greedily, best first, while the token share is not reached
            if held >= self.keep_fraction * total - 1e-9:
                break
            chosen.add((layer, h, j))
            held += g.scale_lengths[j]
        return frozenset(chosen)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        first, kept = self.protected(spec), self.kept_atoms(spec)
        rows = []
        for layer in range(g.num_layers):
            per_head = []
            for h in range(g.num_heads):
                held, row = 0, []
                for s in range(g.num_scales - 1):
                    if s < first or (layer, h, s) in kept:
                        held += g.scale_lengths[s]
                    row.append(held)
                per_head.append(row + [0])
            rows.append(per_head)
        return CachePlan.from_head_rows(rows)

    def select(self, state: SelectionState):
        """Every head keeps the first ``k_h`` of its candidates: its old tokens (all of kept scales),
        then the scale's tokens when the scale is kept (``k_h = o_h + n_s``), else none (``k_h = o_h``)."""
        import torch

        r, h = state.positions.shape[:2]
        k = torch.tensor(state.head_budgets or (state.budget,) * h, device=state.positions.device)
        j = torch.arange(state.budget, dtype=torch.int64, device=state.positions.device)
        return torch.where(j < k.view(-1, 1), j, 0).expand(r, -1, -1)

    def selection(self, geometry) -> dict[str, Any]:
        return {"rule": "planned_prefix"}  # the plan alone decides: equal plans keep equal tokens

    def memory_knob(self, geometry) -> MemoryKnob:
        """``keep_fraction`` from 0 (protected scales only) to 1 (every scale but the last)."""
        return MemoryKnob(0.0, 1.0, False, lambda v: replace(self, keep_fraction=float(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"keep_fraction": 1.0}, "keeps_all": True, "calibrated": True},
            {"params": {"keep_fraction": 0.5}, "calibrated": True},
            {"params": {"keep_fraction": 0.2, "protected_scales": 2}, "calibrated": True},
            {"params": {"keep_fraction": 0.3, "count": "tokens"}, "calibrated": True},
            {"params": {"keep_fraction": 0.0}, "calibrated": True},
        ]


def _score(v: float | None) -> float:
    return -math.inf if v is None else v
