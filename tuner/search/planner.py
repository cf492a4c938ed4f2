"""The planner: (family, params) → the policy a search evaluates, its memory, and its memory violation.

It is the one owner of the memory target: the driver (is a proposed trial over the target?), the
final round (which presets compete?), the export and the objective's constraint all read the
violation from :class:`Planned`, never judge memory themselves. Under a memory target without a
quality limit, every policy's budget knob is first fitted to the target
(:func:`tuner.policies.fit.fit_to_memory`); a policy that cannot fit is returned as it is, with a
positive violation. Memory counts 16-bit K/V with classifier-free guidance, whatever the run computes
in (:func:`tuner.memory.memory_report` with ``dtype="fp16"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuner.mem_target import MemTarget
from tuner.search import trials as T

if TYPE_CHECKING:  # pragma: no cover
    from tuner.model.config import ModelConfig
    from tuner.policies.base import KVPolicy, PolicySpec


@dataclass(frozen=True)
class Planned:
    """A policy as the search evaluates it.

    params: the (fitted) policy's normalised parameters. key: the compiled-plan identity (evaluation
    cache key, :func:`tuner.search.trials.plan_hash`). memory: ``memory_fraction``,
    ``kv_bytes_per_image`` and ``full_kv_bytes_per_image``. violation: the memory constraint in
    Optuna's convention (<= 0 fits), None without a memory target.
    """

    family: str
    params: dict[str, Any]
    policy: "KVPolicy"
    key: str
    memory: dict[str, float]
    violation: float | None

    @property
    def fits(self) -> bool:
        return self.violation is None or self.violation <= 0


class Planner:
    """Plans policies for one model, calibration and memory target."""

    def __init__(self, model_cfg: "ModelConfig", spec: "PolicySpec", mem: MemTarget | None, fit: bool):
        self.model_cfg, self.spec, self.mem, self.fit = model_cfg, spec, mem, fit and mem is not None
        # Planning is deterministic and fitting bisects the knob (dozens of memory reports): the final
        # round re-plans the screened trials and presets, and samplers propose the same point again.
        self._planned: dict[str, Planned] = {}

    def plan(self, family: str, params: dict[str, Any]) -> Planned:
        """The policy the search evaluates for ``(family, params)``; ValueError when it is invalid."""
        key = T.canonical_json([family, params])
        if key not in self._planned:
            self._planned[key] = self._plan(family, params)
        return self._planned[key]

    def _plan(self, family: str, params: dict[str, Any]) -> Planned:
        from tuner.policies.fit import fit_to_memory
        from tuner.policies.registry import make_policy

        policy = make_policy(family, params)
        if self.fit:
            fitted = fit_to_memory(policy, self.spec.geometry, self._fits)
            policy = fitted if fitted is not None else policy
        memory = self.memory(policy)
        return Planned(family, policy.params(), policy, T.plan_hash(policy, self.spec), memory,
                       self.violation(memory))

    def memory(self, policy: "KVPolicy") -> dict[str, float]:
        from tuner.memory import memory_report

        report = memory_report(policy, self.model_cfg, dtype="fp16", cfg=True, spec=self.spec)
        return {"memory_fraction": float(report.fraction),
                "kv_bytes_per_image": float(report.kv_bytes_per_image),
                "full_kv_bytes_per_image": float(report.full_kv_bytes_per_image)}

    def violation(self, memory: dict[str, float]) -> float | None:
        """The memory constraint of a plan's memory figures (None without a target)."""
        if self.mem is None:
            return None
        return self.mem.violation(memory["memory_fraction"], memory["kv_bytes_per_image"])

    def _fits(self, policy: "KVPolicy") -> bool:
        m = self.memory(policy)
        return self.mem.fits(m["memory_fraction"], m["kv_bytes_per_image"])
