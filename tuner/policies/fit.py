"""Fit a policy to a memory target through its one budget knob.

Every compressing family declares a knob that scales its cache without changing its *shape*
(:meth:`tuner.policies.base.KVPolicy.memory_knob`, e.g. ``window``'s ``max_tokens`` or ``scalekv``'s
``budget_fraction``; each family documents its own). A family without one (``full``, an explicit
``budgets`` table) is taken as it is.

:func:`fit_to_memory` sets the knob to the largest value whose planned memory still fits. That is
what a search under a memory target wants: a candidate judged at less memory than it is allowed
loses to a worse-shaped policy that uses all of it, and a candidate just over the target would
otherwise cost a whole trial to learn nothing. Memory is non-decreasing in every knob (more tokens
per layer can only add bytes), so bisection finds the largest fitting value; the returned policy is
always one that was planned and checked, never an extrapolation.
"""
from __future__ import annotations

import math
from typing import Callable

from tuner.policies.base import CacheGeometry, KVPolicy, MemoryKnob

__all__ = ["BISECT_STEPS", "MemoryKnob", "fit_to_memory", "memory_knob"]

BISECT_STEPS = 30  # float knobs: 2^-30 of the range is far below one token


def memory_knob(policy: KVPolicy, geometry: CacheGeometry) -> MemoryKnob | None:
    """The budget knob of ``policy`` on a model of this geometry, or None (``full``, explicit tables)."""
    return policy.memory_knob(geometry)


def fit_to_memory(policy: KVPolicy, geometry: CacheGeometry,
                  fits: Callable[[KVPolicy], bool]) -> KVPolicy | None:
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
