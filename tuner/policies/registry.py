"""The one place where policy families are registered (CLI, search spaces, fitting and tests read it).

Adding a family is one file plus one call::

    from tuner.policies.registry import register
    register("stride", "mypkg.stride:StridePolicy", space="mypkg/stride.yaml")

The class (a frozen-dataclass :class:`~tuner.policies.base.KVPolicy`) declares everything else: its
memory knob (:meth:`~tuner.policies.base.KVPolicy.memory_knob`, what ``--mem-target`` fits) and its
conformance cases (:meth:`~tuner.policies.base.KVPolicy.conformance_cases`, the tests' matrix). A
family is *searchable* (``tuner search --family``, part of ``all``) when it also has a space file:
its registration's ``space``, else the shipped ``search_spaces/<family>.yaml``
(:mod:`tuner.search.space_files`).

Targets given as ``"module:Class"`` strings are imported on first use, so importing this module
imports no policy module (the built-in families are registered that way).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.policies.base import KVPolicy

# Family names appear in YAML keys, Optuna parameter names ("<family>.<param>") and file names.
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED = ("all",)  # ``--family all`` is the union of the searchable families, never a family


@dataclass(frozen=True)
class Registration:
    """One registered family: its class (or where to import it from) and its own space file, if any."""

    family: str
    target: str | type  # "package.module:ClassName" or the class itself
    space: Path | None = None  # None: the shipped search_spaces/<family>.yaml when there is one

    @property
    def module(self) -> str:
        return self.target.partition(":")[0] if isinstance(self.target, str) else self.target.__module__

    @property
    def product(self) -> bool:
        """Whether the family ships with the tuner (its class lives under ``tuner.``), not a test's or
        a plugin's."""
        return self.module == "tuner" or self.module.startswith("tuner.")


_BUILT_IN = {
    "full": "tuner.policies.full:FullPolicy",
    "window": "tuner.policies.window:WindowPolicy",
    "sink_window": "tuner.policies.sink_window:SinkWindowPolicy",
    "ams": "tuner.policies.ams:AMSPolicy",
    "scalekv": "tuner.policies.scalekv:ScaleKVPolicy",
    "budgets": "tuner.policies.budgets:BudgetsPolicy",
    "hack": "tuner.policies.hack:HACKPolicy",
    "heatkv": "tuner.policies.heatkv:HeatKVPolicy",
}
# family name -> registration, in registration order (the order of --family choices and of ``all``).
_REGISTRY: dict[str, Registration] = {name: Registration(name, target) for name, target in _BUILT_IN.items()}


def register(family: str, target: str | type, *, space: str | Path | None = None) -> Registration:
    """Register ``family``; ``target``: a :class:`KVPolicy` subclass or ``"module:Class"`` (imported lazily).

    ``space``: the family's own search-space file (it must exist), for families that live outside
    the package. Registering the same family again with the same target and space is a no-op (worker
    processes may register what their driver did); anything else already registered is a ValueError.
    """
    if not isinstance(family, str) or not _NAME.match(family) or family in RESERVED:
        raise ValueError(f"family name {family!r} must be lower-case letters, digits and _ (and not "
                         f"{', '.join(RESERVED)})")
    if isinstance(target, str):
        module_name, sep, class_name = target.partition(":")
        if not sep or not module_name or not class_name:
            raise ValueError(f"family {family!r}: target {target!r} must look like "
                             "'package.module:ClassName'")
    elif not (isinstance(target, type) and issubclass(target, KVPolicy)):
        raise ValueError(f"family {family!r}: target must be a KVPolicy subclass or 'module:Class', "
                         f"got {target!r}")
    elif target.family != family:
        raise ValueError(f"family {family!r}: {target.__name__}.family is {target.family!r}; they must agree "
                         "(policy files and search records name the family)")
    path = None if space is None else Path(space).resolve()
    if path is not None and not path.is_file():
        raise ValueError(f"family {family!r}: search-space file {space} does not exist")
    new = Registration(family, target, path)
    old = _REGISTRY.get(family)
    if old is not None and old != new:
        raise ValueError(f"policy family {family!r} is already registered (to {old.target!r}); "
                         "unregister it first")
    _REGISTRY[family] = new
    return new


def unregister(family: str) -> None:
    """Remove a family (tests register their own families and take them out again)."""
    if _REGISTRY.pop(family, None) is None:
        raise ValueError(f"policy family {family!r} is not registered")


def registration(family: str) -> Registration:
    """The registration of ``family``; ``ValueError`` naming the known families for an unknown one."""
    try:
        return _REGISTRY[family]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise ValueError(f"unknown policy family {family!r}; known families: {known}") from None


def family_names() -> list[str]:
    """All registered family names, in registration order."""
    return list(_REGISTRY)


def policy_class(family: str) -> type[KVPolicy]:
    """Class of a family; ``ValueError`` naming the known families for an unknown one."""
    target = registration(family).target
    if isinstance(target, type):
        return target
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_policy(family: str, params: dict[str, Any] | None = None) -> KVPolicy:
    """Instantiate a family from a params dict (lists become tuples; a ``kv_format`` list of one repeated
    format becomes that format); fields are validated."""
    cls = policy_class(family)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (params or {}).items()}
    fmt = kwargs.get("kv_format")
    if isinstance(fmt, tuple) and fmt and all(isinstance(f, str) and f == fmt[0] for f in fmt):
        kwargs["kv_format"] = fmt[0]  # the same format for every layer group is that format
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown / missing field names
        raise ValueError(f"bad parameters for policy family {family!r}: {exc}") from None
