"""``budgets``: the joint family — any per-(layer, scale) budget table plus a selection rule."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import (SELECTION_RULES, check_fraction, check_int, check_pool_kernel, clip_row,
                                      round_half_up, rule_description, select_by_rule)


def _floats(name: str, values) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must hold finite numbers, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class BudgetsPolicy(KVPolicy):
    """Explicit budgets, or a compact curve the search can explore, plus a selection rule.

    Give exactly one of:

    - ``table``: ``budgets[layer][scale]`` as ints (``num_layers × num_scales``); it must be a valid
      plan (:meth:`~tuner.policies.base.CachePlan.validate`).
    - ``scale_curve`` (``num_scales - 1`` numbers in ``[0, 1]``) with optional ``layer_weights``
      (``num_layers`` numbers ``>= 0``, rescaled to mean 1; default all 1): layer ``l`` keeps
      ``round(w_l · c_s · T_s)`` tokens after scale ``s`` (``T_s`` = tokens of scales ``0..s``),
      clipped to what it can hold (``<= min(T_s, b[s-1] + n_s)``); the last scale keeps 0. A
      per-scale curve × per-layer multipliers: ``num_scales - 1 + num_layers`` continuous knobs.
      With ``max_tokens`` the layer weights scale a per-layer token cap instead of the curve:
      ``min(round(c_s · T_s), round(w_l · max_tokens))``. A layer's buffer is sized by its largest
      budget, so at a fixed memory the cap form (curve all ones) wastes nothing: every scale keeps
      as much as the layer's buffer holds. That is the form the shipped search space explores
      (per-layer caps + selection rule), and ``window`` / ``sink_window`` are its uniform case.

    Per-head budgets (HACK's contextual/structural split, searchable): with ``contextual_weight``
    ``w`` in ``[0, 1]`` the heads are split by calibrated dispersion (the ``contextual_fraction`` of
    all heads with the highest, ranked over the model, as in ``hack``), and in each layer a contextual
    head plans ``w`` times a structural head's budget, the layer's mean over its heads unchanged:
    ``factor = H / (n_c·w + n_s)`` for structural heads and ``w·factor`` for contextual ones, applied to
    the layer's wanted budgets and clipped per head. The cache then packs each layer's heads without
    padding; this needs calibration (``None``, the default, plans every head alike, no calibration).

    ``rule`` picks the kept tokens: ``recent`` (most recent), ``sink_recent`` (the first
    ``sink_scales`` scales, then most recent) or ``scores`` (ScaleKV's observation-window attention
    mass with ``window_size`` queries and ``pool_kernel`` max-pooling, per row and head).
    """

    table: tuple[tuple[int, ...], ...] | None = None
    scale_curve: tuple[float, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    max_tokens: int | None = None
    rule: str = "recent"
    sink_scales: int = 0
    window_size: int = 16
    pool_kernel: int = 5
    contextual_weight: float | None = None
    contextual_fraction: float = 0.5

    family = "budgets"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.contextual_weight is not None

    @property
    def needs_head_calibration(self) -> bool:  # type: ignore[override]
        return self.contextual_weight is not None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.scale_curve is None):
            raise ValueError("give exactly one of table or scale_curve")
        if self.table is not None:
            if self.layer_weights is not None or self.max_tokens is not None:
                raise ValueError("layer_weights and max_tokens only apply to scale_curve, "
                                 "not to an explicit table")
            try:
                table = tuple(tuple(_int(v) for v in row) for row in self.table)
            except TypeError:
                raise ValueError("table must be a list of per-layer lists of ints") from None
            if not table or any(b < 0 for row in table for b in row):
                raise ValueError("table must be non-empty with non-negative budgets")
            object.__setattr__(self, "table", table)
        else:
            curve = _floats("scale_curve", self.scale_curve)
            if any(not 0.0 <= c <= 1.0 for c in curve):
                raise ValueError(f"scale_curve values must be in [0, 1], got {list(curve)}")
            object.__setattr__(self, "scale_curve", curve)
            if self.layer_weights is not None:
                weights = _floats("layer_weights", self.layer_weights)
                if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
                    raise ValueError("layer_weights must be >= 0 and not all 0")
                object.__setattr__(self, "layer_weights", weights)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"rule must be one of {', '.join(SELECTION_RULES)}, got {self.rule!r}")
        check_int("sink_scales", self.sink_scales, 0)
        check_int("window_size", self.window_size, 1)
        check_pool_kernel(self.pool_kernel)
        if self.contextual_weight is not None:
            if self.table is not None:
                raise ValueError("contextual_weight applies to scale_curve, not to an explicit table")
            check_fraction("contextual_weight", self.contextual_weight, low_open=False)
        check_fraction("contextual_fraction", self.contextual_fraction, low_open=False)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        if self.table is not None:
            plan = CachePlan(self.table)
            plan.validate(g)
            return plan
        if len(self.scale_curve) != g.num_scales - 1:
            raise ValueError(f"scale_curve has {len(self.scale_curve)} values, the model needs "
                             f"{g.num_scales - 1} (one per scale except the last)")
        weights = self.layer_weights or (1.0,) * g.num_layers
        if len(weights) != g.num_layers:
            raise ValueError(f"layer_weights has {len(weights)} values, the model has {g.num_layers} layers")
        mean = sum(weights) / len(weights)
        rows = []
        curve = list(enumerate(self.scale_curve))
        for w in weights:
            if self.max_tokens is None:
                wanted = [round_half_up(w / mean * c * g.tokens_through(s)) for s, c in curve]
            else:
                cap = round_half_up(w / mean * self.max_tokens)
                wanted = [min(round_half_up(c * g.tokens_through(s)), cap) for s, c in curve]
            rows.append(wanted + [0])
        if self.contextual_weight is None:
            return CachePlan(tuple(clip_row(g, row) for row in rows))
        contextual = spec.head_calibration().contextual(self.contextual_fraction)
        return CachePlan.from_head_rows([self._head_rows(g, row, roles)
                                         for row, roles in zip(rows, contextual)])

    def _head_rows(self, g, wanted: list[int], contextual: tuple[bool, ...]) -> list[tuple[int, ...]]:
        """One layer's per-head rows: contextual heads ``w`` times the structural heads' budget."""
        w, n_c = self.contextual_weight, sum(contextual)
        factor = g.num_heads / (n_c * w + (g.num_heads - n_c))
        return [clip_row(g, [round_half_up(b * factor * (w if c else 1.0)) for b in wanted])
                for c in contextual]

    def select(self, state: SelectionState):
        g = state.geometry
        sinks = g.tokens_through(min(self.sink_scales, g.num_scales) - 1)
        return select_by_rule(state, self.rule, sink_tokens=sinks, window_size=self.window_size,
                              pool_kernel=self.pool_kernel)

    def selection(self, geometry) -> dict:
        sinks = geometry.tokens_through(min(self.sink_scales, geometry.num_scales) - 1)
        return rule_description(self.rule, sink_tokens=sinks, window_size=self.window_size,
                                pool_kernel=self.pool_kernel)

    def memory_knob(self, geometry) -> MemoryKnob | None:
        """``max_tokens`` when the curve has a cap; else a multiplier ``m`` on the curve,
        ``c_s' = min(1, m · c_s)`` for ``m`` up to where the smallest positive ``c_s`` reaches 1.
        An explicit table (or an all-zero curve) has no knob: it is taken as it is."""
        if self.scale_curve is None:
            return None
        if self.max_tokens is not None:
            return MemoryKnob.tokens(geometry, lambda v: replace(self, max_tokens=int(v)))
        positive = [c for c in self.scale_curve if c > 0]
        if not positive:
            return None

        def scaled(m: float) -> BudgetsPolicy:
            return replace(self, scale_curve=tuple(min(1.0, m * c) for c in self.scale_curve))

        return MemoryKnob(0.0, 1.0 / min(positive), False, scaled)

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        n = geometry.num_scales - 1

        def curve(*values: float) -> list[float]:  # written for 10 scales; the last value repeats
            return (list(values) + [values[-1]] * n)[:n]

        ramp = [0.5 + i for i in range(geometry.num_layers)]
        return [
            {"params": {"scale_curve": curve(1.0)}, "keeps_all": True, "curve": True},
            {"params": {"scale_curve": curve(1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2), "rule": "recent"},
             "curve": True},
            {"params": {"scale_curve": curve(1.0, 1.0, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1),
                        "layer_weights": ramp, "rule": "sink_recent", "sink_scales": 2}, "curve": True},
            {"params": {"scale_curve": curve(0.5), "layer_weights": ramp, "rule": "scores", "window_size": 9},
             "curve": True},
            {"params": {"scale_curve": curve(1.0), "max_tokens": 12, "layer_weights": ramp,
                        "rule": "sink_recent", "sink_scales": 1}, "curve": True},
            {"params": {"scale_curve": curve(1.0), "max_tokens": 3, "rule": "scores", "window_size": 4},
             "curve": True},
            {"params": {"scale_curve": curve(1.0), "max_tokens": 10, "layer_weights": ramp,
                        "rule": "sink_recent", "sink_scales": 1, "contextual_weight": 0.25},
             "curve": True, "calibrated": True},
            {"params": {"scale_curve": curve(1.0), "max_tokens": 6, "rule": "scores", "window_size": 4,
                        "contextual_weight": 0.0, "contextual_fraction": 0.25},
             "curve": True, "calibrated": True},
        ]


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value
