"""The one place where policy families are registered (CLI, search spaces and tests read it)."""
from __future__ import annotations

import importlib
from typing import Any

from tuner.policies.base import KVPolicy

# family name -> "module:ClassName"; modules are imported on first use (no work at import time).
_FAMILIES: dict[str, str] = {
    "full": "tuner.policies.full:FullPolicy",
    "window": "tuner.policies.window:WindowPolicy",
    "sink_window": "tuner.policies.sink_window:SinkWindowPolicy",
    "ams": "tuner.policies.ams:AMSPolicy",
    "scalekv": "tuner.policies.scalekv:ScaleKVPolicy",
    "budgets": "tuner.policies.budgets:BudgetsPolicy",
}


def family_names() -> list[str]:
    """All registered family names, in registration order."""
    return list(_FAMILIES)


def policy_class(family: str) -> type[KVPolicy]:
    """Class of a family; ``ValueError`` naming the known families for an unknown one."""
    try:
        target = _FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown policy family {family!r}; known families: {', '.join(_FAMILIES)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_policy(family: str, params: dict[str, Any] | None = None) -> KVPolicy:
    """Instantiate a family from a params dict (lists become tuples); fields are validated."""
    cls = policy_class(family)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (params or {}).items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown / missing field names
        raise ValueError(f"bad parameters for policy family {family!r}: {exc}") from None
