"""Search spaces: the bound space (``SearchSpace``) → Optuna suggestions → a policy family and its parameters.

Where the files are and how ``--family`` maps to them is :mod:`tuner.search.space_files`; the file
grammar is read by :mod:`tuner.search.space_schema` into the types below.

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
patch_nums scale_heights scale_widths scale_lengths last_scale_len cached_before_last`` (``patch_nums``:
a square map's side; for a non-square Infinity schedule the heights) and the functions of
:mod:`tuner.search.expr`. Every problem is reported as ``file:line: where: what`` (UserError), and so
is a space over the size limits (file size, YAML nodes and nesting, no YAML aliases, expression
cost, ``repeat``, parameter and choice counts: see :mod:`tuner.search.space_schema`). Optuna
parameter names are ``<family>.<param>`` (``.<i>`` for repeated ones), plus ``family`` when the space
has more than one family.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from tuner.search import expr


def model_symbols(geometry: Any) -> dict[str, Any]:
    """Names a space file may use in bounds, from a :class:`~tuner.policies.base.CacheGeometry`."""
    lengths = tuple(geometry.scale_lengths)
    return {"num_layers": geometry.num_layers, "num_scales": geometry.num_scales, "seq_len": geometry.seq_len,
            "num_heads": geometry.num_heads, "head_dim": geometry.head_dim,
            "patch_nums": tuple(geometry.patch_nums), "scale_lengths": lengths,
            "scale_heights": tuple(h for h, _ in geometry.shapes),
            "scale_widths": tuple(w for _, w in geometry.shapes),
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
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
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
        exhaustively (at most :data:`MAX_HELPER_COMBINATIONS` combinations, and at most
        :data:`MAX_HELPER_WORK` combinations × Optuna parameters) for one that round-trips.
        """
        if family not in self.family_names:
            return None
        fam = self.family(family)
        base: dict[str, Any] = {} if len(self.families) == 1 else {"family": family}
        for p in fam.params:
            if p.name.startswith("_") or policy_params.get(p.name) is None:  # helpers; conditional-off values
                continue
            names = p.optuna_names(family)
            value = policy_params[p.name]
            if p.repeat is None:
                values = [value]
            elif isinstance(value, str):  # one value for every repeat (e.g. kv_format "int4")
                values = [value] * p.repeat
            else:
                values = list(value or ())
            if len(values) != len(names):
                return None
            base.update(zip(names, values))
        helpers = [(n, _helper_values(p)) for p in fam.params if p.name.startswith("_")
                   for n in p.optuna_names(family)]
        total, width = 1, sum(p.repeat or 1 for p in fam.params)
        for _, vals in helpers:
            total *= len(vals)
            if total > MAX_HELPER_COMBINATIONS or total * width > MAX_HELPER_WORK:
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
        if got_family != family or not all(_same(wanted.get(k), v) for k, v in got.items()):
            return False
        # A preset parameter the space does not search (e.g. kv_format "int8" in a 16-bit space) must
        # be the policy's default there, or the trial would run another policy than the preset.
        from tuner.policies.registry import make_policy

        try:
            return make_policy(family, got) == make_policy(family, wanted)
        except ValueError:
            return False


MAX_HELPER_COMBINATIONS = 50_000
MAX_HELPER_WORK = 2_000_000  # each combination replays every parameter of the family once


def _helper_values(p: ParamSpec) -> list[Any]:
    """Candidate values of a helper parameter when inverting a preset (ints: every value if few)."""
    if p.kind == "categorical":
        return list(p.choices)
    if p.kind == "int":
        step = int(p.step or 1)
        count = (int(p.high) - int(p.low)) // step + 1
        return list(range(int(p.low), int(p.high) + 1, step)) if count <= 5000 else [int(p.low), int(p.high)]
    return [p.low, p.high]


def _same(wanted: Any, got: Any) -> bool:
    """Equal, where a single string also equals a list repeating it (a repeated parameter given once)."""
    if isinstance(wanted, str) and isinstance(got, list) and got:
        return all(v == wanted for v in got)
    return wanted == got


def _plain(value: Any) -> Any:
    """Tuples (repeated params) become lists: policy params are JSON-shaped."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
