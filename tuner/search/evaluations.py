"""The evaluation service: cache → worker pool → store, the one way a search evaluates a policy.

The screening loop (one waiter per trial) and the final held-out round (one waiter per candidate
name) both go through :class:`EvaluationService`:

- :meth:`request` answers from the evaluation cache (model hash + compiled plan + eval spec) when it
  can; otherwise it submits the evaluation to the pool, unless the same (plan, spec) is already in
  flight, in which case the waiter joins it. A plan is never evaluated twice on one spec.
- :meth:`poll` returns finished evaluations (:class:`Done`), each stored in the cache and appended
  to the study's evaluation log (``tuner_evaluations``) before anyone is told.

Task ids are this service's own counter; the pool sees nothing else of the bookkeeping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner.search import trials as T

if TYPE_CHECKING:  # pragma: no cover
    from tuner.search.planner import Planned
    from tuner.search.storage import TunerTables


@dataclass
class Done:
    """A finished evaluation: its waiters (first = the one that caused it), plan, metrics or error."""

    waiters: list[Any]
    planned: "Planned"
    metrics: dict[str, float] | None = None  # plan memory merged with the measured metrics
    error: str | None = None


@dataclass
class _Job:
    planned: "Planned"
    spec: dict[str, Any]
    eval_key: str
    waiters: list[Any] = field(default_factory=list)


class EvaluationService:
    """Evaluations of one search run (one model, one study, one driver session)."""

    def __init__(self, tables: "TunerTables", pool: Any, model_hash: str, study_name: str, session_id: str):
        self.tables, self.pool = tables, pool
        self.model_hash, self.study_name, self.session_id = model_hash, study_name, session_id
        self.jobs: dict[int, _Job] = {}
        self.by_key: dict[tuple[str, str], int] = {}
        self.next_id = 0
        self.evaluations = 0  # evaluations finished by this run (cache misses)
        self.submitted = False  # whether the last request started a new evaluation (not cache, not a join)

    @property
    def waiting(self) -> int:
        """Waiters of the evaluations in flight (trials the driver is waiting for)."""
        return sum(len(job.waiters) for job in self.jobs.values())

    def cached(self, planned: "Planned", spec: dict[str, Any]) -> dict[str, float] | None:
        measured = self.tables.cached_metrics(self.model_hash, planned.key, T.eval_key(spec))
        return None if measured is None else {**planned.memory, **measured}

    def request(self, planned: "Planned", spec: dict[str, Any], waiter: Any) -> dict[str, float] | None:
        """Metrics at once from the cache, or None: then ``waiter`` is told through :meth:`poll`."""
        self.submitted = False
        metrics = self.cached(planned, spec)
        if metrics is not None:
            return metrics
        key = (planned.key, T.eval_key(spec))
        if key in self.by_key:
            self.jobs[self.by_key[key]].waiters.append(waiter)
            return None
        task_id, self.next_id = self.next_id, self.next_id + 1
        self.jobs[task_id] = _Job(planned, spec, key[1], [waiter])
        self.by_key[key] = task_id
        self.submitted = True
        self.pool.submit({"task_id": task_id, "family": planned.family, "params": planned.params,
                          "eval": spec})
        return None

    def poll(self, timeout: float) -> list[Done]:
        out = []
        for outcome in self.pool.poll(timeout):
            job = self.jobs.pop(outcome.task_id)
            del self.by_key[(job.planned.key, job.eval_key)]
            if outcome.error is not None:
                out.append(Done(job.waiters, job.planned, error=outcome.error))
                continue
            self.evaluations += 1
            metrics = {**job.planned.memory, **outcome.result["metrics"]}
            seconds = outcome.result.get("seconds")
            self.tables.store_metrics(self.model_hash, job.planned.key, job.eval_key, job.planned.family,
                                      job.planned.params, metrics, seconds)
            self.tables.log_evaluation(self.study_name, self.session_id, self.model_hash, job.planned.key,
                                       job.eval_key, len(job.spec["labels"]), seconds)
            out.append(Done(job.waiters, job.planned, metrics=metrics))
        return out

    def cancel_all(self) -> list[Any]:
        """Forget every evaluation in flight (the pool drops them); returns their waiters."""
        self.pool.cancel_all()
        waiters = [w for job in self.jobs.values() for w in job.waiters]
        self.jobs, self.by_key = {}, {}
        return waiters
