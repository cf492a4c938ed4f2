"""``sink_window``: attention sinks plus a sliding window (StreamingLLM-style), over scales or tokens."""
from __future__ import annotations

from dataclasses import dataclass, replace

from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import check_int, rule_description, scale_window_row, sink_recent_indices


@dataclass(frozen=True)
class SinkWindowPolicy(KVPolicy):
    """Keep the first ``sink_scales`` scales (the sinks) and the last ``window`` scales in every layer.

    ``max_tokens`` caps every layer at that many tokens: the sink tokens first (the first
    ``tokens_through(sink_scales - 1)`` positions, truncated if the cap is smaller), the rest the most
    recent tokens. With ``window >= num_scales`` and a cap this is StreamingLLM (sinks + recent
    tokens) at an exact memory, which :mod:`tuner.presets` uses to compare at the same memory.
    """

    sink_scales: int = 2
    window: int = 2
    max_tokens: int | None = None

    family = "sink_window"

    def __post_init__(self) -> None:
        check_int("sink_scales", self.sink_scales, 0)
        check_int("window", self.window, 1)  # window 0 is "no cache": use max_tokens for tiny budgets
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        row = scale_window_row(g, self.window, self.sink_scales, self.max_tokens)
        return CachePlan(tuple(row for _ in range(g.num_layers)))

    def select(self, state: SelectionState):
        sinks = state.geometry.tokens_through(min(self.sink_scales, state.geometry.num_scales) - 1)
        return sink_recent_indices(state, sinks)

    def selection(self, geometry) -> dict:
        sinks = geometry.tokens_through(min(self.sink_scales, geometry.num_scales) - 1)
        return rule_description("sink_recent", sink_tokens=sinks)

    def memory_knob(self, geometry) -> MemoryKnob:
        """``max_tokens``, the per-layer token cap (sinks and window of scales stay)."""
        return MemoryKnob.tokens(geometry, lambda v: replace(self, max_tokens=int(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"sink_scales": 99, "window": 1}, "keeps_all": True},
            {"params": {"sink_scales": 2, "window": 2}},
            {"params": {"sink_scales": 1, "window": 99, "max_tokens": 9}},
            {"params": {"sink_scales": 3, "window": 1, "max_tokens": 2}},
        ]
