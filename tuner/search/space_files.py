"""Which search-space files a search loads: the shipped ``search_spaces/`` data package, each family's
space file (its registration's own, else ``search_spaces/<family>.yaml``), the ``all`` union and
:func:`load_space`, which reads a file (with its includes) through :mod:`tuner.search.space_schema`
into a :class:`~tuner.search.space.SearchSpace` bound to a model's geometry.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.search.space import FamilySpace, SearchSpace, model_symbols


def space_dir() -> Path:
    """Where the shipped spaces are: the ``search_spaces`` data package (a checkout's or the wheel's)."""
    import search_spaces

    return Path(search_spaces.__file__).resolve().parent



ALL = "all"  # --family all: every searchable family at once
UNION_FILE = "all.yaml"  # the shipped stub that stands for that union (no list of its own)


def family_space_file(family: str) -> Path | None:
    """The space file of a registered family: its registration's own, else the shipped
    ``search_spaces/<family>.yaml``; None when it has neither (registered but not searchable)."""
    from tuner.policies.registry import registration

    own = registration(family).space
    if own is not None:
        return own
    shipped = space_dir() / f"{family}.yaml"
    return shipped if shipped.is_file() else None


def searchable_families() -> list[str]:
    """Registered families with a space file, in registration order (the order of ``all``)."""
    from tuner.policies.registry import family_names

    return [f for f in family_names() if family_space_file(f) is not None]


def family_choices() -> tuple[str, ...]:
    """What ``tuner search --family`` accepts: every searchable family, then ``all``."""
    return (*searchable_families(), ALL)


def family_help() -> str:
    """The ``--family`` help text, from the registry and the space files (read when the CLI is built)."""
    names = searchable_families()
    return (f"{', '.join(names)} or all (their union): a registered policy family with a search-space file "
            f"(search_spaces/<family>.yaml or its registration's own).")


def space_path_for(family: str) -> Path:
    """The space file of ``--family`` (``all``: the shipped union stub, which :func:`load_space` expands)."""
    if family == ALL:
        return space_dir() / UNION_FILE
    path = family_space_file(family)  # ValueError for an unregistered family
    if path is None or not path.is_file():
        missing = path or space_dir() / f"{family}.yaml"
        raise UserError(f"no search space file for --family {family} ({missing} is missing); "
                        "pass --space FILE")
    return path


def _is_union_stub(path: Path) -> bool:
    return path == (space_dir() / UNION_FILE).resolve()


def load_space(path: str | Path, geometry: Any) -> SearchSpace:
    """Load, validate and bind a space file (with its includes) to a model's cache geometry.

    The shipped ``search_spaces/all.yaml`` is a stub: loading it adds the space file of every
    searchable family (:func:`searchable_families`) after it, so ``all`` follows the registry instead of
    a hand-kept include list (a family registered with its own space file is part of it). The stub's
    bytes and each file's are in the digest, in that order.
    """
    from tuner.policies.registry import family_names
    from tuner.search.space_schema import _Budget, load_into

    path = Path(path).resolve()
    symbols = model_symbols(geometry)
    families: dict[str, FamilySpace] = {}
    sources: list[str] = []
    digest = hashlib.sha256()
    known, budget = set(family_names()), _Budget()  # one budget: the limits hold for the whole union
    load_into(path, symbols, known, families, sources, digest, (), budget)
    if _is_union_stub(path):
        for family in searchable_families():
            load_into(family_space_file(family).resolve(), symbols, known, families, sources, digest, (path,),
                      budget)
    if not families:
        raise UserError(f"{path}:1: the search space defines no families; add a 'families:' mapping")
    return SearchSpace(tuple(families.values()), tuple(sources), digest.hexdigest()[:16],
                       tuple(sorted(symbols.items())))
