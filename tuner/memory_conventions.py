"""A plan's KV bytes the way ScaleKV counts them, beside ours (docs/design.md, Memory).

ScaleKV (arXiv 2505.19602, Table 1; reference/methods.md §0) counts the cache *when the last scale
starts*: the tokens every layer holds after the second-to-last scale (6,425 per layer for the full
cache of Infinity at 1024², of 10,521), with K in fp32 and V in bf16 as the official Infinity code
keeps them (K after normalisation and RoPE):

    ScaleKV bytes = Σ_l kept[l][S-2] × rows × heads × head_dim × (4 + 2)   (per image, rows = 2 with CFG)

where ``kept[l][S-2]`` is ``budgets[l][S-2]`` (per-head plans: the mean over heads of their budgets,
counted exactly as ``Σ_h head_budgets[l][S-2][h]`` vectors). The last scale's own tokens are left out
(transient there). Ours (:func:`tuner.memory.memory_report`) counts every buffer the run allocates:
each layer's capacity over all scales plus the shared workspace of the largest scale, or for the
full cache every token of every scale, K and V in 16 bits. For the full cache the two differ by the
fixed factor ``(L × 4) / (T × 6)`` (Infinity 1024²: 10,521·4 / (6,425·6) = 1.0917, ours larger); for
a compressed plan by no fixed factor (capacities and the workspace against the held tokens).

Defined for unquantized storage only: ScaleKV's figures have no int8/int4 layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.policies.base import CacheGeometry, CachePlan

SCALEKV_K_BYTES = 4  # fp32 keys (the official Infinity cache)
SCALEKV_V_BYTES = 2  # bf16 values
MIB = 1 << 20


@dataclass(frozen=True)
class ScaleKVFigure:
    """A plan under ScaleKV's convention.

    tokens_per_layer[l]: tokens layer ``l`` holds when the last scale starts (per-head plans: the
    mean over heads, possibly fractional). bytes_per_image: the formula in the module docstring.
    batch: images; bytes_total = bytes_per_image × batch; mib_total rounded as ScaleKV's tables
    are (to the MiB, Python's round: 17,062.5 → 17,062).
    """

    tokens_per_layer: tuple[float, ...]
    rows_per_image: int
    batch: int
    bytes_per_image: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_per_image * self.batch

    @property
    def mib_total(self) -> int:
        return round(self.bytes_total / MIB)


def scalekv_convention(plan: CachePlan, geometry: CacheGeometry, *, batch: int = 1,
                       cfg: bool = True) -> ScaleKVFigure:
    """``plan``'s bytes under ScaleKV's convention (see the module docstring) for ``batch`` images.

    Raises ``ValueError`` for a plan with quantized layers or one that does not fit ``geometry``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    plan.validate(geometry)
    formats = set(plan.layer_formats(geometry.num_layers))
    if formats != {"compute"}:
        raise ValueError(f"ScaleKV's convention counts unquantized K (fp32) and V (bf16); this plan stores "
                         f"{', '.join(sorted(formats - {'compute'}))} layers")
    g, rows = geometry, 2 if cfg else 1
    before_last = g.num_scales - 2
    if before_last < 0:
        vectors = [0] * g.num_layers
    elif plan.full:
        vectors = [g.tokens_through(before_last) * g.num_heads] * g.num_layers
    else:
        vectors = [plan.kept_vectors(layer, before_last, g.num_heads) for layer in range(g.num_layers)]
    per_vector = rows * g.head_dim * (SCALEKV_K_BYTES + SCALEKV_V_BYTES)
    return ScaleKVFigure(tuple(v / g.num_heads for v in vectors), rows, batch, sum(vectors) * per_vector)


def convention_figures(report: Any, batch: int = 8) -> dict:
    """ScaleKV's figures of a :class:`tuner.memory.MemoryReport`'s plan, JSON-ready: bytes per image
    and MiB for ``batch`` images (ScaleKV's tables use 8), None for quantized plans."""
    try:
        theirs = scalekv_convention(report.plan, report.geometry, batch=batch, cfg=report.rows_per_image == 2)
    except ValueError:
        return {"bytes_per_image": None, "batch": batch, "mib_total": None}
    return {"bytes_per_image": theirs.bytes_per_image, "batch": batch, "mib_total": theirs.mib_total}
