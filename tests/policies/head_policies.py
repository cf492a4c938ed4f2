"""Test-only policies with per-head budgets (``CachePlan.head_budgets``), for the engine, memory and
oracle tests: head ``h`` keeps the last ``windows[h]`` scales, at most ``caps[h]`` tokens (``0``: the
head keeps nothing), and chooses with one of the shared selection rules, applied per head.
"""
from __future__ import annotations

from dataclasses import dataclass

from tuner.policies.base import CachePlan, KVPolicy, PolicySpec, SelectionState
from tuner.policies.selection import scale_window_row, select_by_rule


@dataclass(frozen=True)
class HeadWindows(KVPolicy):
    """Per-head scale windows and token caps (both cycled over the heads); ``rule`` picks the tokens.

    ``uniform=True`` plans the same numbers as an ordinary per-layer plan (every head takes head 0's
    window and cap), to compare the two layouts.
    """

    windows: tuple[int, ...] = (1, 3)
    caps: tuple[int | None, ...] = (None, 0)
    rule: str = "recent"
    sink_tokens: int = 1
    uniform: bool = False
    family = "test-head-windows"

    def head_row(self, spec: PolicySpec, head: int) -> tuple[int, ...]:
        window = self.windows[head % len(self.windows)]
        cap = self.caps[head % len(self.caps)]
        return scale_window_row(spec.geometry, window, cap=cap)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        if self.uniform:
            return CachePlan(tuple(self.head_row(spec, 0) for _ in range(g.num_layers)))
        return CachePlan.from_head_rows([[self.head_row(spec, (h + layer) % g.num_heads)
                                          for h in range(g.num_heads)] for layer in range(g.num_layers)])

    def select(self, state: SelectionState):
        return select_by_rule(state, self.rule, sink_tokens=self.sink_tokens, window_size=4, pool_kernel=3)
