"""The ``full`` policy: the official cache, every token of every scale in every layer."""
from __future__ import annotations

from dataclasses import dataclass

from tuner.policies.base import CachePlan, KVPolicy, PolicySpec, SelectionState


@dataclass(frozen=True)
class FullPolicy(KVPolicy):
    """Keep everything, laid out like the official code (no workspace; last scale appended too).

    This is the reference every memory fraction and every quality metric is measured against.
    """

    family = "full"

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        row = tuple(g.tokens_through(s) for s in range(g.num_scales))
        return CachePlan(budgets=tuple(row for _ in range(g.num_layers)), full=True)

    def select(self, state: SelectionState):
        import torch

        return torch.arange(state.n_candidates, device=state.positions.device)

    def selection(self, geometry) -> dict:
        return {"rule": "all"}

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [{"params": {}, "keeps_all": True}]  # no knob: fitting keeps it only when it fits
