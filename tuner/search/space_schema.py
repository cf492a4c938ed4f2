"""Validation of search-space files (the format is described in :mod:`tuner.search.space`).

Turns the YAML data of one file (with its includes) into :class:`~tuner.search.space.FamilySpace`
objects bound to a model, or raises a one-line ``file:line: where: what`` UserError.

A space file is user input, so its size is bounded before it can cost anything (sized generously
against the shipped ``search_spaces/``, which have 7 parameters per family at most, ``repeat:
num_layers`` (at most 36 on the named models) and 4 choices per categorical): at most
:data:`MAX_FILES` files and :data:`MAX_SPACE_BYTES` bytes with the includes (each file's own bounds
are in :mod:`tuner.search.yaml_lines`, each expression's in :mod:`tuner.search.expr`), ``repeat``
at most :data:`MAX_REPEAT`, at most :data:`MAX_CHOICES` choices per categorical, at most
:data:`MAX_PARAMS` Optuna parameters (repeats counted) and :data:`MAX_TOTAL_CHOICES` categorical
choices over the whole space, and numeric bounds within ``±MAX_BOUND``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.search import expr
from tuner.search.space import FamilySpace, ParamSpec
from tuner.search.yaml_lines import MAX_FILE_BYTES, Located, load_with_lines

SCHEMA_VERSION = 1
_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")
_PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "when", "default", "repeat"}

MAX_FILES = 32  # files loaded for one space, includes counted each time they are included
MAX_SPACE_BYTES = MAX_FILE_BYTES  # all of them together (256 KiB)
MAX_REPEAT = 4096  # repeat: num_layers * num_scales is at most ~500 on the named models
MAX_CHOICES = 1000  # choices of one categorical parameter
MAX_PARAMS = 10_000  # Optuna parameters of the whole space (a repeated parameter counts repeat times)
MAX_TOTAL_CHOICES = 100_000  # categorical choices of the whole space (repeats counted)
MAX_BOUND = 1e18  # |low|, |high|, |step|, repeat


@dataclasses.dataclass
class _Budget:
    """What is left of the whole space's limits while its files are loaded."""

    bytes_left: int = MAX_SPACE_BYTES
    files_left: int = MAX_FILES
    params_left: int = MAX_PARAMS
    choices_left: int = MAX_TOTAL_CHOICES


def load_into(path: Path, symbols: dict, known: set[str], families: dict, sources: list, digest, stack: tuple,
              budget: _Budget | None = None):
    budget = budget if budget is not None else _Budget()
    if path in stack:
        raise UserError(f"{stack[-1]}: include cycle through {path.name}")
    budget.files_left -= 1
    doc = load_with_lines(path)
    budget.bytes_left -= len(doc.raw)
    sources.append(str(path))
    digest.update(doc.raw)
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error((), "a search space must be a mapping with 'families:' (and optionally 'include:')")
    for key in data:
        if key not in ("schema_version", "description", "include", "families"):
            raise doc.error((key,), "unknown key; expected schema_version, description, include, families")
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise doc.error(("schema_version",), f"unsupported schema_version; this tuner reads {SCHEMA_VERSION}")
    includes = data.get("include") or []
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise doc.error(("include",), "must be a list of file names")
    for i, name in enumerate(includes):
        target = (path.parent / name).resolve()
        if not target.is_file():
            raise doc.error(("include", i), f"included file {name} does not exist next to {path.name}")
        if budget.files_left <= 0:
            raise doc.error(("include", i), f"a space may load at most {MAX_FILES} files with its includes "
                                            f"(a file included twice counts twice); include fewer files")
        size = target.stat().st_size
        if size > budget.bytes_left and size <= MAX_FILE_BYTES:
            raise doc.error(("include", i), f"including {name} ({size} bytes) makes the space larger than "
                                            f"{MAX_SPACE_BYTES} bytes with its includes (the limit); "
                                            f"make the files smaller")
        load_into(target, symbols, known, families, sources, digest, stack + (path,), budget)
    fams = data.get("families") or {}
    if not isinstance(fams, dict):
        raise doc.error(("families",), "must be a mapping of family name -> definition")
    for name, body in fams.items():
        where = ("families", name)
        if name not in known:
            raise doc.error(where, f"unknown policy family; registered families: {', '.join(sorted(known))}")
        if name in families:
            raise doc.error(where, "family defined twice (in this file and an included one)")
        families[name] = _family(doc, where, name, body, symbols, budget)


def _family(doc: Located, where: tuple, name: str, body: Any, symbols: dict, budget: _Budget) -> FamilySpace:
    from tuner.policies.registry import policy_class

    if not isinstance(body, dict):
        raise doc.error(where, "a family needs a mapping with params / derived / fixed")
    for key in body:
        if key not in ("params", "derived", "fixed", "description"):
            raise doc.error(where + (key,), "unknown key; expected params, derived, fixed, description")
    cls = policy_class(name)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    defined: dict[str, bool] = {}  # name -> always defined (False: conditional without default)

    def check_name(key: Any, w: tuple) -> None:
        if not isinstance(key, str) or not _NAME.match(key):
            raise doc.error(w, "parameter names must be identifiers (a leading _ marks a helper)")
        if key in defined or key in symbols:
            raise doc.error(w, "name defined twice or shadows a model symbol")
        if fields is not None and not key.startswith("_") and key not in fields:
            raise doc.error(w, f"{name} policies have no parameter {key!r}; "
                               f"known: {', '.join(sorted(fields))}")

    fixed = body.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise doc.error(where + ("fixed",), "must be a mapping name -> value")
    for key in fixed:
        check_name(key, where + ("fixed", key))
        defined[key] = True
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise doc.error(where + ("params",), "must be a mapping name -> {type, low, high, ...}")
    specs = []
    for key, spec in params.items():
        w = where + ("params", key)
        check_name(key, w)
        specs.append(_param(doc, w, key, spec, symbols, defined))
        defined[key] = True  # a conditional parameter that is off reads as its default (or None)
        _spend(doc, w, specs[-1], budget)
    derived = body.get("derived") or {}
    if not isinstance(derived, dict):
        raise doc.error(where + ("derived",), "must be a mapping name -> expression")
    out_derived = []
    for key, text in derived.items():
        w = where + ("derived", key)
        check_name(key, w)
        _check_expr(doc, w, str(text), symbols, defined)
        out_derived.append((key, str(text)))
        defined[key] = True
    return FamilySpace(name, tuple(specs), tuple(out_derived), tuple(fixed.items()))


def _spend(doc: Located, where: tuple, spec: ParamSpec, budget: _Budget) -> None:
    """Count ``spec``'s Optuna parameters and choices against the whole space's limits."""
    count = spec.repeat or 1
    budget.params_left -= count
    budget.choices_left -= count * len(spec.choices)
    if budget.params_left < 0:
        raise doc.error(where, f"the space has more than {MAX_PARAMS} Optuna parameters (repeats counted), "
                               f"the limit; use fewer or smaller repeats")
    if budget.choices_left < 0:
        raise doc.error(where, f"the space has more than {MAX_TOTAL_CHOICES} categorical choices "
                               f"(repeats counted), the limit; use fewer choices or repeats")


def _check_expr(doc: Located, where: tuple, text: str, symbols: dict, defined: dict[str, bool]) -> None:
    try:
        used = expr.names(text)
    except expr.ExprError as exc:
        raise doc.error(where, str(exc)) from None
    for n in sorted(used):
        if n in symbols or defined.get(n):
            continue
        raise doc.error(where, f"unknown name {n!r}; use model symbols ({', '.join(sorted(symbols))}) "
                               f"or parameters defined above")


def _bound(doc: Located, where: tuple, value: Any, symbols: dict) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise doc.error(where, "must be a number or an expression string")
    if isinstance(value, str):
        try:
            value = expr.evaluate(value, symbols)
        except expr.ExprError as exc:
            raise doc.error(where, str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise doc.error(where, f"evaluates to {_short(value)}, not a finite number")
    if abs(value) > MAX_BOUND:
        raise doc.error(where, f"evaluates to {_short(value)}, over the limit of 1e18; use a smaller number")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _param(doc: Located, w: tuple, key: str, spec: Any, symbols: dict, defined: dict) -> ParamSpec:
    """One parameter entry: its keys, type, ``when`` and ``repeat``, then the categorical or numeric part."""
    if not isinstance(spec, dict):
        raise doc.error(w, "a parameter needs a mapping like {type: int, low: 0, high: 4}")
    for k in spec:
        if k not in _PARAM_KEYS:
            raise doc.error(w + (k,), f"unknown key; expected {', '.join(sorted(_PARAM_KEYS))}")
    kind = spec.get("type")
    if kind not in ("int", "float", "categorical"):
        raise doc.error(w + ("type",) if "type" in spec else w, "type must be int, float or categorical")
    when = spec.get("when")
    if when is not None:
        _check_expr(doc, w + ("when",), str(when), symbols, defined)
        when = str(when)
    repeat = _repeat(doc, w, spec, symbols)
    if kind == "categorical":
        return _categorical(doc, w, key, spec, when, repeat)
    return _numeric(doc, w, key, kind, spec, symbols, when, repeat)


def _repeat(doc: Located, w: tuple, spec: dict, symbols: dict) -> int | None:
    """The parameter's ``repeat`` (a positive integer up to :data:`MAX_REPEAT`), or ``None`` without one."""
    if "repeat" not in spec:
        return None
    repeat = _bound(doc, w + ("repeat",), spec["repeat"], symbols)
    if int(repeat) != repeat or repeat < 1:
        raise doc.error(w + ("repeat",), f"must be a positive integer (got {repeat})")
    if repeat > MAX_REPEAT:
        raise doc.error(w + ("repeat",), f"repeat {int(repeat)} is over the limit of {MAX_REPEAT}; "
                                         f"use a smaller repeat")
    return int(repeat)


def _categorical(doc: Located, w: tuple, key: str, spec: dict, when: str | None,
                 repeat: int | None) -> ParamSpec:
    """A ``type: categorical`` parameter: a bounded list of scalar choices, a default among them."""
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, (str, int, float, bool)) or c is None for c in choices):
        raise doc.error(w + ("choices",) if "choices" in spec else w,
                        "needs a non-empty list of scalar choices")
    if len(choices) > MAX_CHOICES:
        raise doc.error(w + ("choices",), f"{len(choices)} choices, over the limit of {MAX_CHOICES}; "
                                          f"use fewer choices (or an int parameter)")
    for k in ("low", "high", "step", "log"):
        if k in spec:
            raise doc.error(w + (k,), "not allowed for a categorical parameter")
    if "default" in spec and spec["default"] not in choices:
        raise doc.error(w + ("default",), "must be one of the choices")
    return ParamSpec(key, "categorical", choices=tuple(choices), when=when, default=spec.get("default"),
                     repeat=repeat, line=doc.line(w))


def _numeric(doc: Located, w: tuple, key: str, kind: str, spec: dict, symbols: dict, when: str | None,
             repeat: int | None) -> ParamSpec:
    """A ``type: int`` or ``type: float`` parameter: bounds, step and log scale evaluated for this model."""
    for k in ("low", "high"):
        if k not in spec:
            raise doc.error(w, f"missing '{k}'")
    if "choices" in spec:
        raise doc.error(w + ("choices",), f"not allowed for a {kind} parameter")
    low, high = (_bound(doc, w + ("low",), spec["low"], symbols),
                 _bound(doc, w + ("high",), spec["high"], symbols))
    step = _bound(doc, w + ("step",), spec["step"], symbols) if "step" in spec else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise doc.error(w + ("log",), "must be true or false")
    if kind == "int":
        low, high = math.ceil(low), math.floor(high)
        if step is not None and (int(step) != step or step < 1):
            raise doc.error(w + ("step",), "must be a positive integer")
    if low > high:
        raise doc.error(w, f"empty range: low {low} > high {high} for this model")
    if step is not None and step <= 0:
        raise doc.error(w + ("step",), "must be positive")
    if log and (low <= 0 or step not in (None, 1)):
        raise doc.error(w + ("log",), "log scale needs low > 0 and no step")
    default = spec.get("default")
    if default is not None and (isinstance(default, bool) or not isinstance(default, (int, float))):
        raise doc.error(w + ("default",), "must be a number")
    return ParamSpec(key, kind, low, high, None if step is None else (int(step) if kind == "int" else step),
                     log, when=when, default=default, repeat=repeat, line=doc.line(w))
