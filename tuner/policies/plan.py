"""The static half of the policy contract: :class:`CachePlan`, the token budgets a policy plans
(docs/design.md, Policies and Memory), and its validation against a model's geometry.

Re-exported by :mod:`tuner.policies.base`, where the rest of the contract lives. No torch here: the
planner and the policy files read plans without loading the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from varkv_kernels.formats import KV_FORMATS
from tuner.geometry import CacheGeometry

HeadBudgets = tuple[tuple[tuple[int, ...], ...], ...]  # [layer][scale][head]


@dataclass(frozen=True)
class CachePlan:
    """Static token budgets.

    Attributes
    ----------
    budgets:
        ``budgets[layer][scale]`` = tokens the layer keeps after scale ``scale``. The entry for the
        last scale is normally 0 (nothing reads it); a positive value keeps (and counts) them. With
        ``head_budgets``: the most any head of the layer keeps, ``max_h head_budgets[layer][scale][h]``
        (the width of ``select``'s answer).
    full:
        The official layout: every layer holds every token of every scale (no workspace, no
        selection). Only the ``full`` policy sets it.
    formats:
        Storage format of each layer's persistent buffer (:data:`varkv_kernels.quant.KV_FORMATS`); ``()``
        (the normal form when every layer is ``compute``) means the compute dtype everywhere.
    head_budgets:
        ``head_budgets[layer][scale][head]`` = tokens head ``head`` of the layer keeps after the
        scale; ``()`` (the normal form) means every head keeps ``budgets[layer][scale]``. When set,
        every layer has an entry for every scale and head, each head obeys the per-layer rules of
        :meth:`validate` on its own, and the cache packs each layer's heads without padding
        (capacity ``C[l][h] = max_s head_budgets[l][s][h]``, docs/design.md, Memory). Build such a
        plan with :meth:`from_head_rows`, which derives ``budgets``.
    """

    budgets: tuple[tuple[int, ...], ...]
    full: bool = False
    formats: tuple[str, ...] = ()
    head_budgets: HeadBudgets = ()

    @classmethod
    def from_head_rows(cls, rows, formats: tuple[str, ...] = ()) -> "CachePlan":
        """A per-head plan from ``rows[layer][head]`` = that head's budgets per scale (the form families
        compute a head in, like a layer's row); ``budgets`` is the per-scale maximum over heads."""
        head_budgets = tuple(tuple(tuple(int(r[s]) for r in layer) for s in range(len(layer[0])))
                             for layer in rows)
        budgets = tuple(tuple(max(per_head) for per_head in layer) for layer in head_budgets)
        return cls(budgets, formats=formats, head_budgets=head_budgets)

    @property
    def per_head(self) -> bool:
        """Whether heads have their own budgets (the packed per-head layout)."""
        return bool(self.head_budgets)

    def layer_formats(self, num_layers: int) -> tuple[str, ...]:
        """The format of every layer (``compute`` for all when ``formats`` is empty)."""
        return self.formats or ("compute",) * num_layers

    def capacity(self, layer: int) -> int:
        """Persistent buffer size of ``layer`` in tokens: ``max_s budgets[layer][s]`` (with per-head
        budgets: of its largest head)."""
        return max(self.budgets[layer]) if self.budgets[layer] else 0

    def capacities(self) -> tuple[int, ...]:
        return tuple(self.capacity(layer) for layer in range(len(self.budgets)))

    def head_budget(self, layer: int, scale: int, num_heads: int) -> tuple[int, ...]:
        """Tokens every head of ``layer`` keeps after ``scale`` (uniform plans: ``budgets`` for each)."""
        if self.head_budgets:
            return self.head_budgets[layer][scale]
        return (self.budgets[layer][scale],) * num_heads

    def head_capacities(self, layer: int, num_heads: int) -> tuple[int, ...]:
        """``C[layer][h] = max_s head_budgets[layer][s][h]`` (uniform plans: ``capacity(layer)`` each)."""
        if self.head_budgets:
            return tuple(max(per_head[h] for per_head in self.head_budgets[layer]) for h in range(num_heads))
        return (self.capacity(layer),) * num_heads

    def kept_vectors(self, layer: int, scale: int, num_heads: int) -> int:
        """(token, head) vectors per row that ``layer`` holds after ``scale``: ``Σ_h`` head budgets."""
        if self.head_budgets:
            return sum(self.head_budgets[layer][scale])
        return self.budgets[layer][scale] * num_heads

    def capacity_vectors(self, layer: int, num_heads: int) -> int:
        """(token, head) vectors per row of ``layer``'s buffer: ``Σ_h C[layer][h]`` (uniform ``H·C[l]``)."""
        if self.head_budgets:
            return sum(self.head_capacities(layer, num_heads))
        return self.capacity(layer) * num_heads

    def validate(self, geometry: CacheGeometry) -> None:
        """Raise ``ValueError`` if the plan does not fit the geometry.

        A budget may not exceed the tokens that exist (``tokens_through(s)``) nor what the layer can
        have at that point (its previous budget plus the scale's new tokens). Per-head budgets obey the
        same rules per head, and ``budgets`` must be their maximum over heads.
        """
        if len(self.budgets) != geometry.num_layers:
            raise ValueError(f"plan has {len(self.budgets)} layers, model has {geometry.num_layers}")
        check_layer_formats(self.formats, geometry, allow_empty=True)
        if self.full:
            if self.head_budgets:
                raise ValueError("the full layout keeps every token in every head: it takes no head_budgets")
            return
        for layer, row in enumerate(self.budgets):
            if len(row) != geometry.num_scales:
                raise ValueError(f"layer {layer}: plan has {len(row)} scales, "
                                 f"model has {geometry.num_scales}")
        if self.head_budgets:  # first: its errors name the head (valid heads imply valid layer maxima)
            _check_head_budgets(self, geometry)
        for layer, row in enumerate(self.budgets):
            _check_row(geometry, row, lambda s, layer=layer: f"budget[{layer}][{s}]")


def _check_row(geometry: CacheGeometry, row, name: Callable[[int], str]) -> None:
    """One layer's (or head's) budgets over the scales: ``0 <= b[s] <= min(T_s, b[s-1] + n_s)``;
    ``name(s)`` spells the entry in the error."""
    prev = 0
    for s, b in enumerate(row):
        if b < 0:
            raise ValueError(f"{name(s)} = {b} is negative")
        limit = min(geometry.tokens_through(s), prev + geometry.scale_lengths[s])
        if b > limit:
            raise ValueError(f"{name(s)} = {b} exceeds the {limit} tokens available at that scale")
        prev = b


def _check_head_budgets(plan: CachePlan, geometry: CacheGeometry) -> None:
    """Shape, integer type and per-head rules of ``plan.head_budgets``; ``budgets`` = their max."""
    table, g = plan.head_budgets, geometry
    if len(table) != g.num_layers:
        raise ValueError(f"head_budgets has {len(table)} layers, model has {g.num_layers}")
    for layer, per_scale in enumerate(table):
        if len(per_scale) != g.num_scales:
            raise ValueError(f"head_budgets[{layer}] has {len(per_scale)} scales, model has {g.num_scales}")
        for s, per_head in enumerate(per_scale):
            if len(per_head) != g.num_heads:
                raise ValueError(f"head_budgets[{layer}][{s}] has {len(per_head)} heads, model has "
                                 f"{g.num_heads}")
            for h, b in enumerate(per_head):
                if isinstance(b, bool) or not isinstance(b, int):
                    raise ValueError(f"head_budgets[{layer}][{s}][{h}] must be an integer, got {b!r}")
            if plan.budgets[layer][s] != max(per_head):
                raise ValueError(f"budget[{layer}][{s}] = {plan.budgets[layer][s]} must be the largest head "
                                 f"budget {max(per_head)} (CachePlan.from_head_rows derives it)")
        for h in range(g.num_heads):
            _check_row(g, [per_head[h] for per_head in per_scale],
                       lambda s, layer=layer, h=h: f"head_budgets[{layer}][{s}][{h}]")


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
