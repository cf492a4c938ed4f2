"""Fit a policy to a memory target through its one budget knob.

Every compressing family has a knob that scales its cache without changing its *shape*:

- ``window`` / ``sink_window``: ``max_tokens`` (per-layer token cap);
- ``ams``: ``c_min`` with ``c_max = c_min + round(r · c_min)``, ``r`` the policy's own ratio
  (``r = 1`` when it had no caps, the AMS-KV paper's 2:1 between demanding and efficient layers);
- ``scalekv``: ``budget_fraction``;
- ``budgets``: its ``max_tokens`` cap when it has one, else a multiplier ``m`` on the scale curve,
  ``c_s' = min(1, m · c_s)``.

:func:`fit_to_memory` sets the knob to the largest value whose planned memory still fits. That is
what a search under a memory target wants: a candidate judged at less memory than it is allowed
loses to a worse-shaped policy that uses all of it, and a candidate just over the target would
otherwise cost a whole trial to learn nothing. Memory is non-decreasing in every knob (more tokens
per layer can only add bytes), so bisection finds the largest fitting value; the returned policy is
always one that was planned and checked, never an extrapolation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from tuner.policies.base import CacheGeometry, KVPolicy

BISECT_STEPS = 30  # float knobs: 2^-30 of the range is far below one token


@dataclass(frozen=True)
class MemoryKnob:
    """A monotone budget knob: ``apply(v)`` for ``v`` in ``[low, high]`` (integers when ``integer``)."""

    low: float
    high: float
    integer: bool
    apply: Callable[[float], KVPolicy]


def _cached_before_last(g: CacheGeometry) -> int:
    return max(1, g.tokens_through(g.num_scales - 2))


def memory_knob(policy: KVPolicy, geometry: CacheGeometry) -> MemoryKnob | None:
    """The budget knob of ``policy`` on a model of this geometry, or None (``full``, explicit tables)."""
    t = _cached_before_last(geometry)
    family = policy.family
    if family in ("window", "sink_window"):
        return MemoryKnob(1, t, True, lambda v: replace(policy, max_tokens=int(v)))
    if family == "scalekv":
        return MemoryKnob(0.5 / t, 1.0, False, lambda v: replace(policy, budget_fraction=float(v)))
    if family == "ams":
        ratio = 1.0 if policy.c_min is None or policy.c_max is None else (policy.c_max - policy.c_min) / policy.c_min

        def ams(v: float) -> KVPolicy:
            c = int(v)
            return replace(policy, c_min=c, c_max=c + int(round(ratio * c)))  # noqa: B023

        return MemoryKnob(1, t, True, ams)
    if family == "budgets" and policy.scale_curve is not None and policy.max_tokens is not None:
        return MemoryKnob(1, t, True, lambda v: replace(policy, max_tokens=int(v)))
    if family == "budgets" and policy.scale_curve is not None:
        positive = [c for c in policy.scale_curve if c > 0]
        if not positive:
            return None

        def budgets(m: float) -> KVPolicy:
            return replace(policy, scale_curve=tuple(min(1.0, m * c) for c in policy.scale_curve))

        return MemoryKnob(0.0, 1.0 / min(positive), False, budgets)
    return None


def fit_to_memory(policy: KVPolicy, geometry: CacheGeometry, fits: Callable[[KVPolicy], bool]) -> KVPolicy | None:
    """``policy`` with its knob at the largest value for which ``fits`` holds.

    Parameters
    ----------
    policy: any policy; families without a knob are returned as they are when they fit.
    geometry: the model's cache geometry (token counts bound the knob).
    fits: ``policy -> bool``, typically "planned KV bytes within the target"; a ``ValueError`` from
        it (a knob value the policy cannot plan) counts as not fitting.

    Returns None when not even the smallest knob value fits.
    """

    def ok(p: KVPolicy) -> bool:
        try:
            return bool(fits(p))
        except ValueError:
            return False

    knob = memory_knob(policy, geometry)
    if knob is None:
        return policy if ok(policy) else None
    if knob.integer:
        best: KVPolicy | None = None
        lo, hi = int(knob.low), int(knob.high)
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = knob.apply(mid)
            if ok(candidate):
                best, lo = candidate, mid + 1
            else:
                hi = mid - 1
        return best
    lo, hi = float(knob.low), float(knob.high)
    top = knob.apply(hi)
    if ok(top):
        return top
    best_v = None
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if ok(knob.apply(mid)):
            best_v, lo = mid, mid
        else:
            hi = mid
    if best_v is None:
        best_v = knob.low if ok(knob.apply(knob.low)) else None
    if best_v is None:
        return None
    # A short number in the policy file (4 decimals, rounded down) when it still fits.
    short = math.floor(best_v * 1e4) / 1e4
    return knob.apply(short) if short >= knob.low and ok(knob.apply(short)) else knob.apply(best_v)
