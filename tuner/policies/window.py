"""``window``: the LLM-style sliding window, over scales and optionally over tokens."""
from __future__ import annotations

from dataclasses import dataclass, replace

from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import check_int, recent_indices, rule_description, scale_window_row


@dataclass(frozen=True)
class WindowPolicy(KVPolicy):
    """Keep the last ``window`` scales in every layer (sliding-window attention, Longformer-style).

    After scale ``s`` each layer keeps scales ``s-window+1 .. s``, so scale ``s+1`` reads ``window``
    earlier scales plus itself; ``window`` must be >= 1 (``max_tokens`` caps it further).
    ``max_tokens`` additionally caps every layer at that many of the most recent tokens: with
    ``window >= num_scales`` it is the token-level sliding window, and it lets the baseline be
    matched to another policy's exact memory (:mod:`tuner.presets`).
    """

    window: int = 2
    max_tokens: int | None = None

    family = "window"

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)  # window 0 is "no cache": use max_tokens for tiny budgets
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        row = scale_window_row(g, self.window, 0, self.max_tokens)
        return CachePlan(tuple(row for _ in range(g.num_layers)))

    def select(self, state: SelectionState):
        return recent_indices(state)

    def selection(self, geometry) -> dict:
        return rule_description("recent")

    def memory_knob(self, geometry) -> MemoryKnob:
        """``max_tokens``, the per-layer token cap (the window of scales stays)."""
        return MemoryKnob.tokens(geometry, lambda v: replace(self, max_tokens=int(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"window": 99}, "keeps_all": True},
            {"params": {"window": 2}},
            {"params": {"window": 1, "max_tokens": 7}},
            {"params": {"window": 1, "max_tokens": 1}},
        ]
