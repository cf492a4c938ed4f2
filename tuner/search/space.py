"""Search spaces: ``search_spaces/*.yaml`` → Optuna suggestions → a policy family and its parameters.

File format (``schema_version: 1``)::

    include: [ams.yaml, scalekv.yaml]          # optional: union with other files (relative paths)
    families:
      ams:                                     # a registered policy family
        params:                                # suggested, in this order (later ones may depend on earlier)
          n_condensed: {type: int, low: 0, high: "min(3, num_scales - 2)"}
          theta: {type: float, low: -2.0, high: 0.0}
          _extra: {type: int, low: 0, high: seq_len, log: false}     # leading "_": helper, not passed on
          drafter_budget: {type: int, low: 1, high: seq_len, when: "n_drafters > 0"}  # off: None
          weights: {type: float, low: 0.0, high: 1.0, repeat: num_scales}   # a list of num_scales values
          rule: {type: categorical, choices: [a, b]}
        derived: {c_max: "c_min + _extra"}     # computed after the params
        fixed: {kernel_size: 5}                # constants

A parameter whose ``when`` is false is not suggested: the policy gets its ``default`` if one is given,
else the policy's own default (expressions then read it as ``None``). Bounds and ``repeat`` may use
the model symbols ``num_layers num_scales seq_len num_heads head_dim
patch_nums scale_lengths last_scale_len cached_before_last`` and the functions of
:mod:`tuner.search.expr`. Every problem is reported as ``file:line: where: what`` (UserError). Optuna
parameter names are ``<family>.<param>`` (``.<i>`` for repeated ones), plus ``family`` when the space
has more than one family.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.search import expr
from tuner.search.yaml_lines import Located, load_with_lines

SPACE_DIR = Path(__file__).resolve().parent.parent.parent / "search_spaces"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")
_PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "when", "default", "repeat"}


def model_symbols(geometry: Any) -> dict[str, Any]:
    """Names a space file may use in bounds, from a :class:`~tuner.policies.base.CacheGeometry`."""
    lengths = tuple(geometry.scale_lengths)
    return {"num_layers": geometry.num_layers, "num_scales": geometry.num_scales, "seq_len": geometry.seq_len,
            "num_heads": geometry.num_heads, "head_dim": geometry.head_dim,
            "patch_nums": tuple(geometry.patch_nums), "scale_lengths": lengths,
            "last_scale_len": lengths[-1], "cached_before_last": geometry.seq_len - lengths[-1]}


@dataclass(frozen=True)
class ParamSpec:
    """One suggested parameter with bounds resolved for the model."""

    name: str
    kind: str  # int | float | categorical
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    when: str | None = None
    default: Any = None
    repeat: int | None = None
    line: int = 0

    def optuna_names(self, family: str) -> list[str]:
        base = f"{family}.{self.name}"
        return [base] if self.repeat is None else [f"{base}.{i}" for i in range(self.repeat)]

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)
        return trial.suggest_categorical(name, list(self.choices))


@dataclass(frozen=True)
class FamilySpace:
    name: str
    params: tuple[ParamSpec, ...]
    derived: tuple[tuple[str, str], ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """The families of a space file (and its includes), bound to one model."""

    families: tuple[FamilySpace, ...]
    sources: tuple[str, ...]
    digest: str
    symbols: tuple[tuple[str, Any], ...] = ()

    @property
    def family_names(self) -> list[str]:
        return [f.name for f in self.families]

    def family(self, name: str) -> FamilySpace:
        for fam in self.families:
            if fam.name == name:
                return fam
        raise KeyError(name)

    def suggest(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """Ask ``trial`` (an Optuna trial, or anything with ``suggest_*``) for a policy."""
        names = self.family_names
        family = names[0] if len(names) == 1 else trial.suggest_categorical("family", names)
        fam = self.family(family)
        env = dict(self.symbols)
        env.update(dict(fam.fixed))
        inactive = set()
        for p in fam.params:
            if p.when is not None and not expr.evaluate(p.when, env):
                env[p.name] = p.default  # None when there is no default: the policy's own default applies
                if p.default is None:
                    inactive.add(p.name)
                continue
            values = [p.suggest(trial, n) for n in p.optuna_names(family)]
            env[p.name] = values[0] if p.repeat is None else tuple(values)
        for name, text in fam.derived:
            env[name] = expr.evaluate(text, env)
        keep = [p.name for p in fam.params] + [n for n, _ in fam.derived] + [n for n, _ in fam.fixed]
        return family, {k: _plain(env[k]) for k in keep if not k.startswith("_") and k not in inactive}

    def trial_params(self, family: str, policy_params: dict[str, Any]) -> dict[str, Any] | None:
        """Optuna params that make :meth:`suggest` return ``policy_params`` (to enqueue presets), or
        None when the space cannot express them (family absent, value off the space).

        Helper parameters (``_name``) cannot be read off a policy: their values are searched
        exhaustively (at most :data:`MAX_HELPER_COMBINATIONS` combinations) for one that round-trips.
        """
        if family not in self.family_names:
            return None
        fam = self.family(family)
        base: dict[str, Any] = {} if len(self.families) == 1 else {"family": family}
        for p in fam.params:
            if p.name.startswith("_") or p.name not in policy_params:
                continue
            names = p.optuna_names(family)
            value = policy_params[p.name]
            values = [value] if p.repeat is None else list(value or ())
            if len(values) != len(names):
                return None
            base.update(zip(names, values))
        helpers = [(n, _helper_values(p)) for p in fam.params if p.name.startswith("_") for n in p.optuna_names(family)]
        total = 1
        for _, vals in helpers:
            total *= len(vals)
        if total > MAX_HELPER_COMBINATIONS:
            return None
        wanted = {k: _plain(v) for k, v in policy_params.items()}
        for combo in itertools.product(*(vals for _, vals in helpers)):
            out = {**base, **{n: v for (n, _), v in zip(helpers, combo)}}
            if self._round_trips(family, out, wanted):
                return out
        return None

    def _round_trips(self, family: str, out: dict[str, Any], wanted: dict[str, Any]) -> bool:

        class _Fixed:  # replays the wanted values through suggest() to check they round-trip and fit
            def suggest_int(self, name, low, high, **k):
                if not low <= out[name] <= high:
                    raise KeyError(name)
                return out[name]

            suggest_float = suggest_int

            def suggest_categorical(self, name, choices):
                if out[name] not in choices:
                    raise KeyError(name)
                return out[name]

        try:
            got_family, got = self.suggest(_Fixed())
        except (KeyError, expr.ExprError, TypeError):
            return False
        return got_family == family and all(wanted.get(k) == v for k, v in got.items())


MAX_HELPER_COMBINATIONS = 50_000


def _helper_values(p: ParamSpec) -> list[Any]:
    """Candidate values of a helper parameter when inverting a preset (ints: every value if few)."""
    if p.kind == "categorical":
        return list(p.choices)
    if p.kind == "int":
        step = int(p.step or 1)
        count = (int(p.high) - int(p.low)) // step + 1
        return list(range(int(p.low), int(p.high) + 1, step)) if count <= 5000 else [int(p.low), int(p.high)]
    return [p.low, p.high]


def _plain(value: Any) -> Any:
    """Tuples (repeated params) become lists: policy params are JSON-shaped."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def space_path_for(family: str) -> Path:
    """The shipped space file of ``--family`` (``all`` is the union file)."""
    path = SPACE_DIR / f"{family}.yaml"
    if not path.is_file():
        raise UserError(f"no search space file for --family {family} ({path} is missing); pass --space FILE")
    return path


def load_space(path: str | Path, geometry: Any) -> SearchSpace:
    """Load, validate and bind a space file (with its includes) to a model's cache geometry."""
    from tuner.policies.registry import family_names

    symbols = model_symbols(geometry)
    families: dict[str, FamilySpace] = {}
    sources: list[str] = []
    digest = hashlib.sha256()
    _load_into(Path(path).resolve(), symbols, set(family_names()), families, sources, digest, ())
    if not families:
        raise UserError(f"{path}:1: the search space defines no families; add a 'families:' mapping")
    return SearchSpace(tuple(families.values()), tuple(sources), digest.hexdigest()[:16],
                       tuple(sorted(symbols.items())))


def _load_into(path: Path, symbols: dict, known: set[str], families: dict, sources: list, digest, stack: tuple):
    if path in stack:
        raise UserError(f"{stack[-1]}: include cycle through {path.name}")
    doc = load_with_lines(path)
    sources.append(str(path))
    digest.update(path.read_bytes())
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
        _load_into(target, symbols, known, families, sources, digest, stack + (path,))
    fams = data.get("families") or {}
    if not isinstance(fams, dict):
        raise doc.error(("families",), "must be a mapping of family name -> definition")
    for name, body in fams.items():
        where = ("families", name)
        if name not in known:
            raise doc.error(where, f"unknown policy family; registered families: {', '.join(sorted(known))}")
        if name in families:
            raise doc.error(where, "family defined twice (in this file and an included one)")
        families[name] = _family(doc, where, name, body, symbols)


def _family(doc: Located, where: tuple, name: str, body: Any, symbols: dict) -> FamilySpace:
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
            raise doc.error(w, f"{name} policies have no parameter {key!r}; known: {', '.join(sorted(fields))}")

    fixed = body.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise doc.error(where + ("fixed",), "must be a mapping name -> value")
    for key, value in fixed.items():
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
        raise doc.error(where, f"evaluates to {value!r}, not a finite number")
    return value


def _param(doc: Located, w: tuple, key: str, spec: Any, symbols: dict, defined: dict) -> ParamSpec:
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
    repeat = None
    if "repeat" in spec:
        repeat = _bound(doc, w + ("repeat",), spec["repeat"], symbols)
        if int(repeat) != repeat or repeat < 1:
            raise doc.error(w + ("repeat",), f"must be a positive integer (got {repeat})")
        repeat = int(repeat)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, (str, int, float, bool)) or c is None for c in choices):
            raise doc.error(w + ("choices",) if "choices" in spec else w, "needs a non-empty list of scalar choices")
        for k in ("low", "high", "step", "log"):
            if k in spec:
                raise doc.error(w + (k,), "not allowed for a categorical parameter")
        if "default" in spec and spec["default"] not in choices:
            raise doc.error(w + ("default",), "must be one of the choices")
        return ParamSpec(key, kind, choices=tuple(choices), when=when, default=spec.get("default"),
                         repeat=repeat, line=doc.line(w))
    for k in ("low", "high"):
        if k not in spec:
            raise doc.error(w, f"missing '{k}'")
    if "choices" in spec:
        raise doc.error(w + ("choices",), f"not allowed for a {kind} parameter")
    low, high = _bound(doc, w + ("low",), spec["low"], symbols), _bound(doc, w + ("high",), spec["high"], symbols)
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
