"""The policy matrix every family must pass (kvpress-style data table), read from the registry.

Each family keeps its own cases (:meth:`tuner.policies.base.KVPolicy.conformance_cases`, easy →
aggressive params for a geometry), so a newly registered family joins the matrix by itself. A case
is ``{"params": {...}}`` plus the flags ``calibrated`` (plans with synthetic calibration statistics),
``keeps_all`` (every layer keeps every token: images bit-identical to the full cache) and ``curve``
(params hold lists sized to the geometry).
"""
from __future__ import annotations

from tests.policies.helpers import TINY
from tuner.policies.base import CacheGeometry, KVPolicy
from tuner.policies.registry import family_names, make_policy, policy_class

FLAGS = ("keeps_all", "calibrated", "curve")


def cases(family: str, geometry: CacheGeometry) -> list[dict]:
    """The family's cases for ``geometry`` (each checked to hold only ``params`` and known flags)."""
    out = policy_class(family).conformance_cases(geometry)
    for i, case in enumerate(out):
        unknown = set(case) - {"params", *FLAGS}
        assert "params" in case and not unknown, f"{family} case {i}: unknown keys {sorted(unknown)}"
    return out


def case(family: str, index: int, geometry: CacheGeometry) -> dict:
    return cases(family, geometry)[index]


def case_ids(families: list[str] | None = None) -> list[tuple[str, int]]:
    """``(family, index)`` for every case of every registered family (the count does not depend on the
    geometry, so it is read on the tiny model's)."""
    names = family_names() if families is None else families
    return [(f, i) for f in names for i in range(len(cases(f, TINY)))]


def build(family: str, index: int, geometry: CacheGeometry) -> tuple[KVPolicy, dict]:
    """The case's policy for ``geometry`` and the case itself."""
    c = case(family, index, geometry)
    return make_policy(family, c["params"]), c
