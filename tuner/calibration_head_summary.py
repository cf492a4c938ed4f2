"""The per-(layer, head) part of :class:`tuner.calibration.Calibration`: what head-aware policies plan from.

:mod:`tuner.calibration_heads` measures the full statistics (``mass[l, h, s_q, s_src]``, dispersion, with
a half-split noise floor). Policies need a small, JSON-able summary of them that travels inside the
calibration (and so inside every policy file that plans from it), computed in the same pass as the other
calibration statistics:

- ``scas[l][h][j]``: HeatKV's S-CAS (arXiv 2605.14877, ``tools/compute_scas.py``) of source scale
  ``j``: the mean over the later query scales ``i > j`` of the mass scale ``i``'s queries put on scale
  ``j``'s keys. ``None`` for the last scale (nothing reads it). No scale is protected here: the
  ``heatkv`` policy protects its own initial scales.
- ``history_mass[l][h][s]``: the mass scale ``s``'s queries put on all earlier scales (0 at ``s = 0``):
  how much a head reads the cache at all.
- ``dispersion[l][h]``: HACK's contextual-vs-structural measurement (definition in
  :mod:`tuner.calibration_heads`): near 1 when all queries read the same history keys (contextual),
  lower when each query reads keys of its own (structural). ``None`` where no scale had a history of
  two tokens.

No torch here (the planner and policy files read it without the engine), except in :meth:`from_measured`
and the two tensor helpers below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Table3 = tuple[tuple[tuple[float | None, ...], ...], ...]


@dataclass(frozen=True)
class HeadCalibration:
    """Per-(layer, head) calibration summary (module docstring). Shapes: ``scas`` and ``history_mass``
    ``[L][H][S]``, ``dispersion`` ``[L][H]``."""

    scas: Table3
    history_mass: Table3
    dispersion: tuple[tuple[float | None, ...], ...]

    def __post_init__(self) -> None:
        layers, heads = len(self.dispersion), len(self.dispersion[0]) if self.dispersion else 0
        if not layers or not heads or any(len(row) != heads for row in self.dispersion):
            raise ValueError("head calibration dispersion must be a non-empty layers × heads table")
        for name in ("scas", "history_mass"):
            table = getattr(self, name)
            scales = len(table[0][0]) if table and table[0] else 0
            if len(table) != layers or any(len(per_head) != heads or any(len(r) != scales for r in per_head)
                                          for per_head in table) or not scales:
                raise ValueError(f"head calibration {name} must be {layers} layers × {heads} heads × scales")

    @property
    def num_layers(self) -> int:
        return len(self.dispersion)

    @property
    def num_heads(self) -> int:
        return len(self.dispersion[0])

    @property
    def num_scales(self) -> int:
        return len(self.scas[0][0])

    def check_shape(self, num_layers: int, num_heads: int, num_scales: int) -> None:
        """``ValueError`` unless the summary is for this many layers, heads and scales."""
        have = (self.num_layers, self.num_heads, self.num_scales)
        if have != (num_layers, num_heads, num_scales):
            raise ValueError(f"head calibration is for {have[0]} layers × {have[1]} heads × {have[2]} "
                             f"scales, the model has {num_layers} × {num_heads} × {num_scales}")

    def contextual(self, fraction: float) -> tuple[tuple[bool, ...], ...]:
        """``[L][H]``: the ``round(fraction · L·H)`` heads of highest dispersion, ranked over all layers
        together (HACK ranks heads globally); ties broken by (layer, head). Heads without a dispersion
        rank last."""
        ranked = sorted(((-(d if d is not None else -math.inf), layer, h)
                         for layer, row in enumerate(self.dispersion) for h, d in enumerate(row)))
        count = math.floor(fraction * len(ranked) + 0.5)
        chosen = {(layer, h) for _, layer, h in ranked[:count]}
        return tuple(tuple((layer, h) in chosen for h in range(self.num_heads))
                     for layer in range(self.num_layers))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"scas": _lists(self.scas), "history_mass": _lists(self.history_mass),
                "dispersion": _lists(self.dispersion)}

    @classmethod
    def from_dict(cls, d: Any) -> "HeadCalibration":
        """From :meth:`to_dict` output; ``ValueError`` on anything malformed."""
        if not isinstance(d, dict):
            raise ValueError("head calibration must be a mapping")
        try:
            return cls(scas=_table3(d["scas"]), history_mass=_table3(d["history_mass"]),
                       dispersion=tuple(tuple(_num(v) for v in row) for row in d["dispersion"]))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed head calibration: {exc!r}") from None

    @classmethod
    def from_measured(cls, mass: Any, dispersion: Any) -> "HeadCalibration":
        """From ``mass [L, H, S, S]`` and ``dispersion [L, H]`` tensors (NaN = undefined), as
        :class:`tuner.calibration_heads_observer.HeadStatsObserver` measures them."""
        def plain(t) -> Any:
            return _none_for_nan(t.tolist())

        return cls(scas=plain(scas_of(mass)), history_mass=plain(history_mass_of(mass)),
                   dispersion=plain(dispersion))


def history_mass_of(mass: Any) -> Any:
    """``[L, H, S]``: mass that scale ``s``'s queries put on all earlier scales (0 at ``s = 0``)."""
    return mass.tril(-1).sum(-1)


def scas_of(mass: Any, sink_scales: int = 0) -> Any:
    """HeatKV's S-CAS ``[L, H, S]`` of ``mass [L, H, S_q, S_src]``: per source scale ``j``, the mean over
    the later query scales ``i > j`` of ``mass[..., i, j]`` (its ``tools/compute_scas.py``); NaN for
    ``j < sink_scales`` (always kept there) and for the last scale (nothing reads it later)."""
    import torch

    s = mass.shape[-1]
    out = torch.full(mass.shape[:3], float("nan"), dtype=mass.dtype)
    for j in range(sink_scales, s - 1):
        out[..., j] = mass[..., j + 1:, j].mean(-1)
    return out


def _none_for_nan(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_none_for_nan(x) for x in v)
    return None if math.isnan(v) else float(v)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"not a finite number: {v!r}")
    return float(v)


def _table3(rows: Any) -> Table3:
    return tuple(tuple(tuple(_num(v) for v in r) for r in per_head) for per_head in rows)


def _lists(t: Any) -> Any:
    return [_lists(v) for v in t] if isinstance(t, tuple) else t
