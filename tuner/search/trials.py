"""Identities and records shared by the driver, the reports and ``tuner show``.

- :func:`plan_hash`: the identity of what a policy makes the engine do (its compiled plan: the token
  budget table, the storage formats and the selection rule), the key of the evaluation cache
  together with the model hash and :func:`eval_key`. Two parameter sets (or two families) that
  compile to the same plan share one evaluation.
- :func:`policy_hash`: the identity of a policy's parameters (family + normalised parameters).
- :func:`eval_spec`: the plain-dict description of an evaluation (labels, seed, sampling) sent to
  workers; screening and final (held-out) specs differ by seed and size.
- :class:`TrialRecord`: what the driver keeps per finished trial, rebuilt from the study on resume.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# User attributes the driver writes on trials.
A_FAMILY, A_POLICY, A_HASH, A_METRICS = "family", "policy_params", "policy_hash", "metrics"
A_SESSION, A_PLAN_INFEASIBLE, A_CACHE_HIT, A_ERROR = "session", "plan_infeasible", "cache_hit", "error"
A_PRESET, A_FIXED, A_RETRY_OF, A_INTERRUPTED = "preset", "fixed_policy", "retry_of", "interrupted"
A_DUPLICATE_OF, A_IMAGES = "duplicate_of", "images_generated"
FINAL_SEED_OFFSET = 1_000_003  # held-out seeds for re-evaluation never overlap screening seeds


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def policy_hash(family: str, params: dict[str, Any]) -> str:
    """Stable identity of a policy; pass parameters normalised by the policy (``policy.params()``)."""
    return hashlib.sha256(canonical_json({"family": family, "params": params}).encode()).hexdigest()[:32]


def plan_hash(policy: Any, spec: Any) -> str:
    """Stable identity of ``policy``'s compiled plan under ``spec`` (a PolicySpec; ValueError like ``plan``).

    The engine calls a policy only through ``plan`` (the budgets) and ``select`` (described by
    :meth:`~tuner.policies.base.KVPolicy.selection`), so equal hashes generate equal images.
    """
    plan = policy.plan(spec)
    doc = {"budgets": [list(row) for row in plan.budgets], "full": plan.full,
           "selection": policy.selection(spec.geometry)}
    if plan.formats:  # absent for 16-bit plans, so their keys are what they always were
        doc["formats"] = list(plan.formats)
    if plan.head_budgets:  # absent for uniform plans (same keys as before); budgets hold only the max
        doc["head_budgets"] = [[list(h) for h in s] for s in plan.head_budgets]
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:32]


def eval_spec(samples: int, num_classes: int, seed: int, *, cfg: float, top_k: int, top_p: float,
              batch_size: int, final: bool = False) -> dict[str, Any]:
    """Labels spread evenly over the classes; the final spec uses held-out seeds and shifted labels."""
    shift = (num_classes // max(samples, 1)) // 2 if final else 0
    if samples <= num_classes:
        labels = [(i * num_classes) // samples + shift for i in range(samples)]
    else:
        labels = [(i + shift) % num_classes for i in range(samples)]
    return {"labels": [label % num_classes for label in labels],
            "seed": seed + (FINAL_SEED_OFFSET if final else 0),
            "cfg": cfg, "top_k": top_k, "top_p": top_p, "batch_size": batch_size}


def eval_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:20]


@dataclass
class TrialRecord:
    """A finished trial as the driver and the reports see it."""

    number: int
    state: str  # COMPLETE | FAIL | PRUNED
    family: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    values: list[float] | None = None
    constraints: dict[str, float] = field(default_factory=dict)
    plan_infeasible: bool = False
    preset: str | None = None
    cache_hit: bool = False
    error: str | None = None
    # why it was cut short ("ctrl-c", "driver gone", ...): re-queued, not counted
    interrupted: str | None = None
    trial_params: dict[str, Any] = field(default_factory=dict)  # the sampler's parameters (Optuna's view)
    # an earlier trial of the study screened the same plan and this one generated nothing: not counted
    duplicate_of: int | None = None
    plan_key: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.state == "COMPLETE" and not self.plan_infeasible

    @property
    def counts(self) -> bool:
        """Counts toward ``--trials``: finished, not cut short by an interruption (those are retried) and
        not a duplicate (a policy the study had already screened, answered from the cache)."""
        return self.interrupted is None and self.duplicate_of is None

    @property
    def feasible(self) -> bool:
        return self.evaluated and all(v <= 0 for v in self.constraints.values())

    @classmethod
    def from_frozen(cls, t: Any) -> "TrialRecord":
        ua = t.user_attrs
        return cls(number=t.number, state=t.state.name, family=ua.get(A_FAMILY),
                   params=dict(ua.get(A_POLICY) or {}), metrics=dict(ua.get(A_METRICS) or {}),
                   values=list(t.values) if t.values is not None else None,
                   constraints={str(k): float(v) for k, v in (t.constraints or {}).items()},
                   plan_infeasible=bool(ua.get(A_PLAN_INFEASIBLE)), preset=ua.get(A_PRESET),
                   cache_hit=bool(ua.get(A_CACHE_HIT)), error=ua.get(A_ERROR),
                   interrupted=ua.get(A_INTERRUPTED), trial_params=dict(t.params),
                   duplicate_of=ua.get(A_DUPLICATE_OF), plan_key=ua.get(A_HASH))


def load_records(study: Any) -> list[TrialRecord]:
    """Finished trials of ``study`` (COMPLETE, FAIL, PRUNED), in trial order."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False, states=states)]


def best_records(records: list[TrialRecord], k: int, multi: bool) -> list[TrialRecord]:
    """Up to ``k`` feasible evaluated trials, best first (single objective: by value; multi: the
    Pareto front ordered by the quality objective), one per distinct policy."""
    from tuner.search.objective import pareto_front

    feasible = [r for r in records if r.feasible and r.values]
    if multi:
        front = pareto_front([(r, r.values) for r in feasible])
        rest = sorted((r for r in feasible if r not in front), key=lambda r: (r.values[1], r.values[0]))
        ordered = sorted(front, key=lambda r: (r.values[1], r.values[0])) + rest
    else:
        ordered = sorted(feasible, key=lambda r: (r.values[0], r.number))
    out, seen = [], set()
    for r in ordered:
        key = canonical_json([r.family, r.params])
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == k:
            break
    return out
