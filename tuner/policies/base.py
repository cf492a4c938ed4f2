"""The policy contract: static budgets (``plan``) and token selection (``select``).

A policy is a frozen dataclass of hyperparameters. The engine calls it in two places:

1. ``plan(spec) -> CachePlan`` once, before any image is generated. ``budgets[l][s]`` is the number
   of tokens layer ``l`` keeps *after* processing scale ``s`` (what scale ``s+1`` will read besides
   its own tokens). Memory is a function of the plan alone (docs/design.md, Memory), so it is a guarantee.
2. ``select(state) -> indices`` right after layer ``l``'s attention at scale ``s``: which of the
   candidate tokens (the layer's previously kept tokens followed by the current scale's tokens)
   the layer keeps. Exactly ``budgets[l][s]`` indices, unique, sorted ascending.

Per-head budgets (optional, ``CachePlan.head_budgets[l][s][h]``): head ``h`` of layer ``l`` keeps its
own number of tokens. Then ``budgets[l][s]`` is the largest of them (``max_h``), each head's
candidates are its own kept tokens followed by the scale's tokens (a valid prefix of a padded axis,
see :class:`SelectionState`), and ``select`` returns ``[R, H, budgets[l][s]]`` whose first
``head_budgets[l][s][h]`` entries in head ``h``'s rows are that head's choice (the tail is ignored).

Nothing here imports optuna, ray or mlflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from varkv_kernels.formats import KV_FORMATS
from tuner.geometry import CacheGeometry
from tuner.policies.plan import CachePlan, HeadBudgets, check_layer_formats

__all__ = ["CacheGeometry", "CachePlan", "HeadBudgets", "KVPolicy", "MemoryKnob", "PolicySpec",
           "SelectionState", "cached_before_last", "check_layer_formats", "resolve_kv_format"]

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class PolicySpec:
    """What a policy may look at when it plans: geometry, model identity and calibration stats.

    ``calibration`` is a :class:`tuner.calibration.Calibration` (or ``None``); policies whose
    ``needs_calibration`` is true raise ``ValueError`` when it is missing rather than defaulting.
    """

    geometry: CacheGeometry
    model_name: str = ""
    calibration: Any = None

    def head_calibration(self) -> Any:
        """The calibration's per-(layer, head) summary
        (:class:`tuner.calibration_head_summary.HeadCalibration`), checked against the geometry;
        ``ValueError`` naming the fix when there is none (head-aware families plan from it)."""
        heads = getattr(self.calibration, "heads", None)
        if heads is None:
            raise ValueError("this policy plans from per-head calibration statistics (attention per head and "
                             "source scale); run `tuner calibrate` for this model (statistics saved by an "
                             "older tuner have none)")
        g = self.geometry
        heads.check_shape(g.num_layers, g.num_heads, g.num_scales)
        return heads


@dataclass
class SelectionState:
    """What ``select`` sees for one (layer, scale). Built by the engine's cache.

    Shapes: R = rows (2 per image with CFG), H = heads, n = candidates = ``n_old`` kept tokens
    followed by the current scale's ``n_new`` tokens, d = head_dim.

    Attributes
    ----------
    positions: ``[R, H, n]`` int64 global token positions of the candidates (old ones ascending,
               then the current scale's tokens in raster order).
    queries:   ``[R, H, n_new, d]`` the current scale's queries exactly as used in attention
               (for VAR: L2-normalised and multiplied by the per-head scale).
    k_old, v_old: ``[R, H, n_old, d]`` the layer's kept tokens (views into the cache buffer).
    k_new, v_new: ``[R, H, n_new, d]`` the current scale's keys/values.
    softmax_scale: the factor applied to ``q·k`` inside the softmax (1.0 for VAR's cosine attention).
    backend:   attention backend chosen for the run (``torch`` or ``triton``), for scorers.
    head_budgets: per-head plans only (``None`` otherwise): ``k_h``, what head ``h`` keeps;
               ``budget = max_h k_h``.
    old_lens:  per-head plans only: ``o_h``, head ``h``'s kept tokens (``n_old = max_h o_h``).

    With per-head budgets the candidate axis is ragged: head ``h`` has ``n_h = o_h + n_new``
    candidates, its ``o_h`` kept tokens then the scale's tokens, as a *valid prefix* of a padded axis
    of ``n = n_old + n_new``. ``positions`` holds ``-1`` after the prefix, :attr:`keys` / :attr:`values`
    zeros; ``k_old`` / ``v_old`` hold head ``h``'s tokens in their first ``o_h`` slots (zeros after).
    Why a valid prefix: it is the kernels' ragged convention (``token_scores``' ``key_lens``), so
    scorers, recency and pooling work per head unchanged, and one tensor keeps every rule batched.
    """

    layer: int
    scale: int
    budget: int
    geometry: CacheGeometry
    positions: "torch.Tensor"
    queries: "torch.Tensor"
    k_old: "torch.Tensor"
    v_old: "torch.Tensor"
    k_new: "torch.Tensor"
    v_new: "torch.Tensor"
    softmax_scale: float = 1.0
    backend: str = "torch"
    head_budgets: tuple[int, ...] | None = None
    old_lens: tuple[int, ...] | None = None

    @property
    def n_old(self) -> int:
        """Kept tokens before this scale (per-head plans: the most any head kept)."""
        return int(self.k_old.shape[2])

    @property
    def n_new(self) -> int:
        return int(self.k_new.shape[2])

    @property
    def n_candidates(self) -> int:
        """Candidates (per-head plans: the padded axis; each head's own count is :attr:`candidate_lens`)."""
        return self.n_old + self.n_new

    @property
    def ragged(self) -> bool:
        """Whether heads have their own budgets (see the class docstring)."""
        return self.head_budgets is not None

    @property
    def candidate_lens(self) -> tuple[int, ...]:
        """``n_h`` per head: its kept tokens plus the scale's (every head ``n_candidates`` if not ragged)."""
        heads = int(self.k_new.shape[1])
        if self.old_lens is None:
            return (self.n_candidates,) * heads
        return tuple(o + self.n_new for o in self.old_lens)

    @property
    def keys(self) -> "torch.Tensor":
        """``[R, H, n, d]`` all candidate keys (concatenated on demand; ragged: per-head valid prefix)."""
        return self._candidates(self.k_old, self.k_new)

    @property
    def values(self) -> "torch.Tensor":
        return self._candidates(self.v_old, self.v_new)

    def _candidates(self, old: "torch.Tensor", new: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.old_lens is None:
            return torch.cat((old, new), dim=2)
        out = torch.cat((old, torch.zeros_like(new)), dim=2)
        for h, o in enumerate(self.old_lens):  # each head's new tokens right after its own kept ones
            out[:, h, o:o + self.n_new] = new[:, h]
        return out


@dataclass(frozen=True)
class MemoryKnob:
    """A policy's one budget knob: ``apply(v)`` is the policy with the knob at ``v`` in ``[low, high]``
    (integers when ``integer``). Planned memory must be non-decreasing in ``v`` and the policy's
    *shape* (windows, rules, roles) unchanged: :func:`tuner.policies.fit.fit_to_memory` bisects it.
    """

    low: float
    high: float
    integer: bool
    apply: Callable[[float], "KVPolicy"]

    @classmethod
    def tokens(cls, geometry: CacheGeometry, apply: Callable[[float], "KVPolicy"]) -> "MemoryKnob":
        """An integer per-layer token knob from 1 to :func:`cached_before_last` (what any layer can hold)."""
        return cls(1, cached_before_last(geometry), True, apply)


def cached_before_last(geometry: CacheGeometry) -> int:
    """Tokens of every scale but the last (at least 1): the most a layer's buffer ever needs."""
    return max(1, geometry.tokens_through(geometry.num_scales - 2))


@dataclass(frozen=True)
class KVPolicy:
    """Base class of all policy families (subclasses are frozen dataclasses).

    Subclasses set ``family`` and implement :meth:`plan_tokens` and :meth:`select`, validate their
    fields in ``__post_init__`` (``ValueError``), and are registered once with
    :func:`tuner.policies.registry.register`. Optional: :meth:`memory_knob` (without it the family
    is never fitted to a memory target) and :meth:`conformance_cases` (the tests' matrix).

    Every family inherits ``kv_format`` (keyword-only), how its kept tokens are stored: one of
    :data:`varkv_kernels.quant.KV_FORMATS` for every layer, or a tuple of ``G <= num_layers`` formats for
    ``G`` contiguous layer groups (layer ``l`` takes ``kv_format[l * G // num_layers]``; ``G =
    num_layers`` is per layer). The default ``compute`` is the 16-bit cache of every paper.
    """

    kv_format: str | tuple[str, ...] = field(default="compute", kw_only=True)

    family: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # Plans from the per-(layer, head) summary ``calibration.heads`` (implies needs_calibration).
    needs_head_calibration: ClassVar[bool] = False

    def plan(self, spec: PolicySpec) -> CachePlan:
        """The policy's :class:`CachePlan`: :meth:`plan_tokens`' budgets with the layers' formats."""
        plan = self.plan_tokens(spec)
        formats = self.layer_formats(spec.geometry)
        return dataclasses.replace(plan, formats=() if set(formats) == {"compute"} else formats)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:  # pragma: no cover - abstract
        """The token budgets (``formats`` left empty: :meth:`plan` adds them)."""
        raise NotImplementedError

    def layer_formats(self, geometry: CacheGeometry) -> tuple[str, ...]:
        """``kv_format`` resolved to one format per layer; ``ValueError`` for unknown formats or more
        groups than layers."""
        return resolve_kv_format(self.kv_format, geometry)

    def select(self, state: SelectionState) -> "torch.Tensor":  # pragma: no cover - abstract
        """Indices into the candidates to keep.

        Returns ``[k]`` (the same tokens for every row and head) or ``[R, H, k]`` (per row and
        head), int64, unique and sorted ascending along the last dim, ``k == state.budget``.

        Per-head budgets (``state.ragged``): ``[R, H, k]`` with ``k = max_h k_h``; in head ``h``'s rows
        the first ``k_h = state.head_budgets[h]`` entries are unique, sorted ascending and below
        ``state.candidate_lens[h]``; the rest of the row is ignored. ``[k]`` is accepted only when every
        head has the same old length and budget (then it means the same tokens in every head).
        """
        raise NotImplementedError

    def selection(self, geometry: CacheGeometry) -> dict[str, Any]:
        """What :meth:`select` does, as a JSON-able description: two policies with equal plans and
        equal descriptions keep the same tokens, so they share one evaluation (the search's cache key).

        The default names the family and every parameter (never wrongly equal); families whose rule is
        one of :data:`tuner.policies.selection.SELECTION_RULES` describe it by the rule alone.
        """
        return {"family": self.family, "params": self.params()}

    def params(self) -> dict[str, Any]:
        """Hyperparameters as a JSON-able dict (the dataclass fields). ``kv_format`` appears only when
        it is not the default ``compute``, so a 16-bit policy reads as it always has (older policy
        files and studies)."""
        out = {f.name: _jsonable(getattr(self, f.name))
               for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        if out.get("kv_format") == "compute":
            del out["kv_format"]
        return out

    def memory_knob(self, geometry: CacheGeometry) -> MemoryKnob | None:
        """The knob that scales this policy's cache on a model of ``geometry``, or None: not fittable
        (the policy is then taken as it is under a memory target, e.g. ``full`` or an explicit table)."""
        return None

    @classmethod
    def conformance_cases(cls, geometry: CacheGeometry) -> list[dict[str, Any]]:
        """Example parameters every family must pass (tests/policies), easy → aggressive, for ``geometry``.

        Each case is ``{"params": {...}}`` plus optional flags: ``keeps_all`` (every layer keeps every
        token: images bit-identical to the full cache), ``calibrated`` (plans from calibration
        statistics; the tests give synthetic ones) and ``curve`` (params hold per-scale or per-layer
        lists sized to ``geometry``). The number of cases must not depend on the geometry.
        """
        return []


def resolve_kv_format(kv_format: Any, geometry: CacheGeometry) -> tuple[str, ...]:
    """One format per layer from a ``kv_format`` value (see :class:`KVPolicy`)."""
    n = geometry.num_layers
    groups = (kv_format,) if isinstance(kv_format, str) else tuple(kv_format) if isinstance(
        kv_format, (tuple, list)) else None
    if not groups or len(groups) > n:
        raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)} or a list of 1 to {n} of them "
                         f"(layer groups), got {kv_format!r}")
    formats = tuple(groups[layer * len(groups) // n] for layer in range(n))
    check_layer_formats(formats, geometry)
    return formats


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
