"""``ams``: AMS-KV (arXiv 2511.16047) as reconstructed from the paper (its code is not public).

Condensed (coarsest) scales pinned, a local window of recent scales, and a larger window for
cache-demanding layers: layers whose inter-scale key similarity is low.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import (check_fraction, check_int, round_half_up, rule_description,
                                      scale_window_row, sink_recent_indices)

DEFAULT_THETA_QUANTILE = 0.25


@dataclass(frozen=True)
class AMSPolicy(KVPolicy):
    """AMS-KV: condensed scales + local window, per-layer window by inter-scale key similarity.

    After scale ``s`` a layer keeps the ``n_condensed`` coarsest scales and its last ``w`` scales,
    where ``w = window_demanding`` for cache-demanding layers and ``window`` for cache-efficient ones,
    capped at ``c_max`` / ``c_min`` tokens (condensed tokens first, then the most recent tokens).
    Eviction is FIFO over the intermediate scales; no attention scores are needed.

    A layer's similarity is :meth:`tuner.calibration.Calibration.layer_similarity` (negative L2
    distance between keys of scale ``s`` and the 2-D upsampled keys of scale ``s-1``, averaged).
    The demanding layers are chosen by exactly one of:

    - ``theta``: the layers whose similarity is below ``theta`` (the paper's threshold; its scale
      depends on the model);
    - ``theta_quantile`` (default ``0.25`` when neither is given): the ``round(q · num_layers)``
      layers with the lowest similarity (ties by layer index) — i.e. ``theta`` set at the
      ``q``-quantile of the calibrated similarities. The same value means the same thing on every
      model, and the memory no longer depends on the calibration (only which layers get more).

    Calibration is required unless both layer classes get the same budget
    (``window == window_demanding`` and ``c_min == c_max``); without it ``plan`` raises ValueError.
    """

    n_condensed: int = 2
    window: int = 1
    window_demanding: int = 2
    theta: float | None = None
    theta_quantile: float | None = None
    c_min: int | None = None
    c_max: int | None = None

    family = "ams"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_int("n_condensed", self.n_condensed, 0)
        check_int("window", self.window, 0)
        check_int("window_demanding", self.window_demanding, 0)
        if self.window_demanding < self.window:
            raise ValueError(f"window_demanding ({self.window_demanding}) must be >= window ({self.window})")
        if self.theta is not None and self.theta_quantile is not None:
            raise ValueError("give theta or theta_quantile, not both")
        theta = self.theta
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not math.isfinite(theta)):
            raise ValueError(f"theta must be a finite number, got {self.theta!r}")
        check_fraction("theta_quantile", self.theta_quantile, low_open=False, allow_none=True)
        check_int("c_min", self.c_min, 1, allow_none=True)
        check_int("c_max", self.c_max, 1, allow_none=True)
        if self.c_min is not None and self.c_max is not None and self.c_max < self.c_min:
            raise ValueError(f"c_max ({self.c_max}) must be >= c_min ({self.c_min})")

    @property
    def uniform(self) -> bool:
        """True when demanding and efficient layers get the same budget (no calibration needed)."""
        return self.window == self.window_demanding and self.c_min == self.c_max

    def demanding_layers(self, spec: PolicySpec) -> tuple[bool, ...]:
        """Per layer: is it cache-demanding? (all False when the policy is :attr:`uniform`)."""
        n = spec.geometry.num_layers
        if self.uniform:
            return (False,) * n
        cal = spec.calibration
        if cal is None:
            raise ValueError("the ams policy needs calibration statistics (per-layer inter-scale key "
                             "similarity); run `tuner calibrate` for this model and plan with them")
        sims = tuple(cal.layer_similarity())
        if len(sims) != n:
            raise ValueError(f"calibration has {len(sims)} layers, the model has {n}")
        if self.theta is not None:
            return tuple(s < self.theta for s in sims)
        q = DEFAULT_THETA_QUANTILE if self.theta_quantile is None else self.theta_quantile
        count = min(n, round_half_up(q * n))
        lowest = sorted(range(n), key=lambda layer: (sims[layer], layer))[:count]
        return tuple(layer in lowest for layer in range(n))

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        if self.n_condensed >= g.num_scales:
            raise ValueError(f"n_condensed={self.n_condensed} must be below the model's {g.num_scales} "
                             "scales (condensed scales are a prefix, the rest is windowed)")
        efficient = scale_window_row(g, self.window, self.n_condensed, self.c_min)
        demanding = scale_window_row(g, self.window_demanding, self.n_condensed, self.c_max)
        return CachePlan(tuple(demanding if d else efficient for d in self.demanding_layers(spec)))

    def select(self, state: SelectionState):
        g = state.geometry
        return sink_recent_indices(state, g.tokens_through(min(self.n_condensed, g.num_scales) - 1))

    def selection(self, geometry) -> dict:
        sinks = geometry.tokens_through(min(self.n_condensed, geometry.num_scales) - 1)
        return rule_description("sink_recent", sink_tokens=sinks)

    def memory_knob(self, geometry) -> MemoryKnob:
        """``c_min`` with ``c_max = c_min + round(r · c_min)``, ``r`` this policy's own ratio (``r = 1``
        without caps: the AMS-KV paper's 2:1 between demanding and efficient layers)."""
        no_caps = self.c_min is None or self.c_max is None
        ratio = 1.0 if no_caps else (self.c_max - self.c_min) / self.c_min

        def at(v: float) -> AMSPolicy:
            c = int(v)
            return replace(self, c_min=c, c_max=c + int(round(ratio * c)))

        return MemoryKnob.tokens(geometry, at)

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [
            {"params": {"window": 99, "window_demanding": 99}, "keeps_all": True},
            {"params": {}, "calibrated": True},
            {"params": {"n_condensed": 1, "window": 1, "window_demanding": 3, "theta": -0.7},
             "calibrated": True},
            {"params": {"n_condensed": 2, "window": 0, "window_demanding": 1, "theta_quantile": 0.5,
                        "c_min": 4, "c_max": 12}, "calibrated": True},
        ]
