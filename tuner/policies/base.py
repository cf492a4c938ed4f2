"""The policy contract: static budgets (``plan``) and token selection (``select``).

A policy is a frozen dataclass of hyperparameters. The engine calls it in two places:

1. ``plan(spec) -> CachePlan`` once, before any image is generated. ``budgets[l][s]`` is the number
   of tokens layer ``l`` keeps *after* processing scale ``s`` (what scale ``s+1`` will read besides
   its own tokens). Memory is a function of the plan alone (docs/design.md, Memory), so it is a guarantee.
2. ``select(state) -> indices`` right after layer ``l``'s attention at scale ``s``: which of the
   candidate tokens (the layer's previously kept tokens followed by the current scale's tokens)
   the layer keeps. Exactly ``budgets[l][s]`` indices, unique, sorted ascending.

Nothing here imports optuna, ray or mlflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from kernels.formats import KV_FORMATS
from tuner.geometry import CacheGeometry

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


@dataclass(frozen=True)
class CachePlan:
    """Static token budgets.

    Attributes
    ----------
    budgets:
        ``budgets[layer][scale]`` = tokens the layer keeps after scale ``scale``. The entry for the
        last scale is normally 0 (nothing reads it); a positive value keeps (and counts) them.
    full:
        The official layout: every layer holds every token of every scale (no workspace, no
        selection). Only the ``full`` policy sets it.
    formats:
        Storage format of each layer's persistent buffer (:data:`kernels.quant.KV_FORMATS`); ``()``
        (the normal form when every layer is ``compute``) means the compute dtype everywhere.
    """

    budgets: tuple[tuple[int, ...], ...]
    full: bool = False
    formats: tuple[str, ...] = ()

    def layer_formats(self, num_layers: int) -> tuple[str, ...]:
        """The format of every layer (``compute`` for all when ``formats`` is empty)."""
        return self.formats or ("compute",) * num_layers

    def capacity(self, layer: int) -> int:
        """Persistent buffer size of ``layer`` in tokens: ``max_s budgets[layer][s]``."""
        return max(self.budgets[layer]) if self.budgets[layer] else 0

    def capacities(self) -> tuple[int, ...]:
        return tuple(self.capacity(layer) for layer in range(len(self.budgets)))

    def validate(self, geometry: CacheGeometry) -> None:
        """Raise ``ValueError`` if the plan does not fit the geometry.

        A budget may not exceed the tokens that exist (``tokens_through(s)``) nor what the layer can
        have at that point (its previous budget plus the scale's new tokens).
        """
        if len(self.budgets) != geometry.num_layers:
            raise ValueError(f"plan has {len(self.budgets)} layers, model has {geometry.num_layers}")
        check_layer_formats(self.formats, geometry, allow_empty=True)
        if self.full:
            return
        for layer, row in enumerate(self.budgets):
            if len(row) != geometry.num_scales:
                raise ValueError(f"layer {layer}: plan has {len(row)} scales, "
                                 f"model has {geometry.num_scales}")
            prev = 0
            for s, b in enumerate(row):
                if b < 0:
                    raise ValueError(f"budget[{layer}][{s}] = {b} is negative")
                limit = min(geometry.tokens_through(s), prev + geometry.scale_lengths[s])
                if b > limit:
                    raise ValueError(
                        f"budget[{layer}][{s}] = {b} exceeds the {limit} tokens available at that scale"
                    )
                prev = b


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

    @property
    def n_old(self) -> int:
        return int(self.k_old.shape[2])

    @property
    def n_new(self) -> int:
        return int(self.k_new.shape[2])

    @property
    def n_candidates(self) -> int:
        return self.n_old + self.n_new

    @property
    def keys(self) -> "torch.Tensor":
        """``[R, H, n, d]`` all candidate keys (concatenated on demand)."""
        import torch

        return torch.cat((self.k_old, self.k_new), dim=2)

    @property
    def values(self) -> "torch.Tensor":
        import torch

        return torch.cat((self.v_old, self.v_new), dim=2)


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
    :data:`kernels.quant.KV_FORMATS` for every layer, or a tuple of ``G <= num_layers`` formats for
    ``G`` contiguous layer groups (layer ``l`` takes ``kv_format[l * G // num_layers]``; ``G =
    num_layers`` is per layer). The default ``compute`` is the 16-bit cache of every paper.
    """

    kv_format: str | tuple[str, ...] = field(default="compute", kw_only=True)

    family: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

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


def check_layer_formats(formats: tuple[str, ...], geometry: CacheGeometry, allow_empty: bool = False) -> None:
    """``ValueError`` unless ``formats`` names a known format for every layer (int4: even head_dim)."""
    if allow_empty and not formats:
        return
    if len(formats) != geometry.num_layers:
        raise ValueError(f"plan has formats for {len(formats)} layers, model has {geometry.num_layers}")
    for layer, fmt in enumerate(formats):
        if fmt not in KV_FORMATS:
            raise ValueError(f"layer {layer}: unknown KV format {fmt!r}; use one of {', '.join(KV_FORMATS)}")
        if fmt == "int4" and geometry.head_dim % 2:
            raise ValueError(f"layer {layer}: int4 storage needs an even head_dim, the model has "
                             f"{geometry.head_dim}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
