"""Objectives and constraints of a search (docs/design.md, Search), as functions of a metrics dict.

- ``--mem-target X`` only: minimise the quality metric, constraint ``memory <= X``.
- ``--fid-limit Y`` only: minimise the memory fraction, constraint ``quality <= Y``.
- both: minimise (memory fraction, quality) with both constraints; the Pareto front is the answer.

Quality metrics where larger is better (``psnr``, ``ssim``) enter negated, so every objective is
minimised and ``--fid-limit`` means "at least Y" for them. Constraint values follow Optuna's
convention (<= 0 feasible) and are relative, so memory and quality violations are comparable. The
memory violation itself is the planner's (:mod:`tuner.search.planner`): the objective only places it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuner.mem_target import MemTarget
from tuner.quality.metric_info import METRICS
from tuner.search.config import SearchConfig



@dataclass(frozen=True)
class Objective:
    metric: str
    mem: MemTarget | None
    limit: float | None

    @classmethod
    def from_config(cls, cfg: SearchConfig) -> "Objective":
        return cls(cfg.metric, cfg.mem_target, cfg.quality_limit)

    @property
    def maximize(self) -> bool:
        return METRICS[self.metric].higher_is_better

    @property
    def multi(self) -> bool:
        return self.mem is not None and self.limit is not None

    @property
    def names(self) -> list[str]:
        quality = f"-{self.metric}" if self.maximize else self.metric
        if self.multi:
            return ["memory_fraction", quality]
        return [quality] if self.mem is not None else ["memory_fraction"]

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.names)

    def quality(self, metrics: dict[str, float]) -> float:
        """The minimised quality value (negated for larger-is-better metrics)."""
        if self.metric not in metrics:
            raise ValueError(f"the evaluator returned no {self.metric!r} (got {', '.join(sorted(metrics))})")
        v = float(metrics[self.metric])
        # identical images: PSNR is +inf; Optuna stores finite values best
        if self.maximize and v == math.inf:
            v = 1e3
        return -v if self.maximize else v

    def values(self, metrics: dict[str, float]) -> list[float]:
        mem = float(metrics["memory_fraction"])
        if self.multi:
            return [mem, self.quality(metrics)]
        return [self.quality(metrics)] if self.mem is not None else [mem]

    def quality_violation(self, metrics: dict[str, float]) -> float | None:
        if self.limit is None:
            return None
        target = -self.limit if self.maximize else self.limit
        return (self.quality(metrics) - target) / max(abs(self.limit), 1.0)

    def constraints(self, metrics: dict[str, float], memory_violation: float | None) -> dict[str, float]:
        """Optuna constraint values (<= 0 feasible); the memory one comes from the planner."""
        out = {}
        if memory_violation is not None:
            out["memory"] = memory_violation
        quality = self.quality_violation(metrics)
        if quality is not None:
            out["quality"] = quality
        return out

    def placeholder_values(self, fraction: float, worst_quality: float | None) -> list[float]:
        """Values told for a trial rejected by the planner (memory over target, never evaluated)."""
        # before any quality exists: the metric's worst value (never better than a real one)
        worst = METRICS[self.metric].worst
        quality = worst_quality if worst_quality is not None else (-worst if self.maximize else worst)
        if self.multi:
            return [fraction, quality]
        return [quality] if self.mem is not None else [fraction]

    def describe(self) -> str:
        parts = []
        if self.mem is not None:
            parts.append(f"memory <= {self.mem.describe()}")
        if self.limit is not None:
            parts.append(f"{self.metric} {'>=' if self.maximize else '<='} {self.limit:g}")
        goal = " and ".join(f"min {n}" for n in self.names)
        return f"{goal} subject to {', '.join(parts)}"


def pareto_front(points: list[tuple[Any, list[float]]]) -> list[Any]:
    """Items whose value vectors are not dominated by another's (all objectives minimised)."""
    front = []
    for i, (item, v) in enumerate(points):
        dominated = False
        for j, (_, w) in enumerate(points):
            if j != i and all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)):
                dominated = True
                break
        if not dominated:
            front.append(item)
    return front
