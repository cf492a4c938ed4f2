"""The search driver: ask → plan (:mod:`tuner.search.planner`) → (infeasible | screen chunk by chunk,
through :mod:`tuner.search.evaluations`, pruned or not (:mod:`tuner.search.fidelity`)) → tell; the only
writer of study state (docs/design.md, "Search").

A trial whose plan an earlier trial of the study already screened is a *duplicate*: it is answered
from the evaluation cache, told to the sampler (so it learns) and does not count toward ``--trials``.

``run_search(cfg)`` validates everything that can be validated without side effects (space file,
model, storage and MLflow reachability) before it writes anything, starts the evaluation pool
(model loads once per worker), opens or resumes the study, enqueues the paper presets, runs the
ask/tell loop under the stop rule with a live display, and finally re-evaluates the best candidates
on held-out seeds and exports the winner (:mod:`tuner.search.export`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.search import trials as T
from tuner.search.config import SearchConfig
from tuner.search.objective import Objective
from tuner.search.progress import ProgressView, trial_line
from tuner.search.runtime import SearchRuntime, prepare_runtime
from tuner.search.stop import InterruptFlag, StopRule

HEARTBEAT_S = 10.0
POLL_S = 0.25


@dataclass
class SearchResult:
    study_name: str
    storage: str
    out_dir: Path
    stop_reason: str
    records: list[T.TrialRecord]
    interrupted: bool = False
    policy_path: Path | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    evaluations: int = 0  # evaluations run by this invocation (cache misses)
    exit_code: int = 0  # 128 + signal number when interrupted


@dataclass
class Screening:
    """A trial being screened: the chunks measured so far (one per rung, see tuner.search.fidelity)."""

    trial: Any
    planned: Any
    duplicate_of: int | None = None  # an earlier trial of the study with the same plan
    chunks: list[dict[str, float]] = field(default_factory=list)
    new_work: bool = False  # at least one chunk was evaluated for it (not all from the cache)
    images: int = 0  # images generated for it (chunks it started; cached or joined ones not)


class SearchDriver:
    """The ask/tell loop over the runtime's planner and evaluation service."""

    def __init__(self, rt: SearchRuntime):
        self.rt = rt
        self.cfg: SearchConfig = rt.cfg
        self.objective: Objective = rt.objective
        self.records: list[T.TrialRecord] = T.load_records(rt.study)
        self.since_improvement = 0
        self.duplicate_streak = 0  # consecutive duplicates (the stop rule ends an exhausted space)
        self.fidelity = self.cfg.fidelity
        self.front: list[T.TrialRecord] = []  # feasible evaluated trials, non-dominated (single: the best)
        self.seen: dict[str, int] = {}  # plan key -> first trial of the study that screened it
        for rec in self.records:
            self._improves(rec)
            if rec.plan_key and rec.state in ("COMPLETE", "PRUNED") and not rec.plan_infeasible:
                self.seen.setdefault(rec.plan_key, rec.number)
        self.view: ProgressView | None = None

    @property
    def evaluations(self) -> int:
        return self.rt.evals.evaluations

    # -- asking -------------------------------------------------------------------------------------------
    def ask_one(self) -> None:
        rt = self.rt
        trial = rt.study.ask()
        trial.set_user_attr(T.A_SESSION, rt.session_id)
        fixed = trial.user_attrs.get(T.A_FIXED)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # enqueued values are checked by the space
                family, params = rt.space.suggest(trial)
        except (ValueError, KeyError, TypeError) as exc:  # e.g. a re-queued point the edited space lost
            if not fixed:
                self._fail(trial, None, {}, f"cannot decode the trial: {exc}")
                return
        if fixed:
            family, params = fixed["family"], dict(fixed["params"])
        try:
            planned = rt.planner.plan(family, params)
        except ValueError as exc:  # a combination the policy rejects: not evaluable
            self._fail(trial, family, params, f"invalid policy: {exc}")
            return
        trial.set_user_attr(T.A_FAMILY, family)
        trial.set_user_attr(T.A_POLICY, planned.params)
        trial.set_user_attr(T.A_HASH, planned.key)
        if not planned.fits:
            self._tell_plan_infeasible(trial, planned)
            return
        screening = Screening(trial, planned, duplicate_of=self.seen.get(planned.key))
        self.seen.setdefault(planned.key, trial.number)
        self._advance(screening)

    # -- screening, chunk by chunk ------------------------------------------------------------------------
    def _advance(self, s: Screening) -> None:
        """Request the trial's next chunks: cached ones at once, until one must be waited for (it comes
        back through :meth:`complete`) or the trial is told."""
        while True:
            spec = self.rt.screen_specs[len(s.chunks)]
            metrics = self.rt.evals.request(s.planned, spec, s)
            if metrics is None:
                if self.rt.evals.submitted:
                    s.new_work, s.images = True, s.images + len(spec["labels"])
                return
            s.chunks.append(metrics)
            if self._after_chunk(s):
                return

    def _after_chunk(self, s: Screening) -> bool:
        """Pool the chunks, report the intermediate value, prune or finish; True when the trial is told."""
        from tuner.search.fidelity import pool_chunks

        metrics = pool_chunks(s.chunks)
        rung = len(s.chunks)
        if self.fidelity.pruning:
            try:
                intermediate = self.objective.quality(metrics)
            except ValueError as exc:
                self._fail(s.trial, s.planned.family, s.planned.params, f"unusable metrics: {exc}")
                return True
            s.trial.report(intermediate, step=self.fidelity.rungs[rung - 1])
            if rung < len(self.fidelity.rungs) and s.trial.should_prune():
                self._tell_pruned(s, metrics)
                return True
        if rung == len(self.fidelity.rungs):
            self._tell(s, metrics)
            return True
        return False

    # -- telling ---------------------------------------------------------------------------------------------
    def complete(self, done: Any) -> None:
        """A finished evaluation (one chunk): every trial that waited for it goes on or is told."""
        for s in done.waiters:
            if done.error is not None:
                self._fail(s.trial, done.planned.family, done.planned.params, done.error)
            else:
                s.chunks.append(done.metrics)
                if not self._after_chunk(s):
                    self._advance(s)

    def _flags(self, s: Screening) -> dict[str, Any]:
        """Record flags and trial attributes of a screened trial: cache hit, duplicate, images."""
        duplicate = s.duplicate_of if (s.duplicate_of is not None and not s.new_work) else None
        s.trial.set_user_attr(T.A_IMAGES, s.images)
        if not s.new_work:
            s.trial.set_user_attr(T.A_CACHE_HIT, True)
        if duplicate is not None:
            s.trial.set_user_attr(T.A_DUPLICATE_OF, duplicate)
        self.duplicate_streak = self.duplicate_streak + 1 if duplicate is not None else 0
        return {"cache_hit": not s.new_work, "duplicate_of": duplicate}

    def _tell_pruned(self, s: Screening, metrics: dict[str, float]) -> None:
        from optuna.trial import TrialState

        trial, planned = s.trial, s.planned
        constraints = {"memory": planned.violation} if planned.violation is not None else {}
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr(T.A_METRICS, metrics)
        flags = self._flags(s)
        self.rt.study.tell(trial, state=TrialState.PRUNED)
        self._record(trial, "PRUNED", planned.family, planned.params, metrics, None, constraints, **flags)

    def _tell(self, s: Screening, metrics: dict[str, float]) -> None:
        import math

        trial, planned = s.trial, s.planned
        family, params = planned.family, planned.params
        try:
            values = self.objective.values(metrics)
            constraints = self.objective.constraints(metrics, planned.violation)
        except (KeyError, ValueError) as exc:
            self._fail(trial, family, params, f"unusable metrics: {exc}")
            return
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, family, params, f"non-finite objective {values}")
            return
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr(T.A_METRICS, metrics)
        flags = self._flags(s)
        self.rt.study.tell(trial, values)
        self._record(trial, "COMPLETE", family, params, metrics, values, constraints, **flags)

    def _tell_plan_infeasible(self, trial: Any, planned: Any) -> None:
        worst = max((r.values[-1] for r in self.records if r.evaluated and r.values), default=None)
        values = self.objective.placeholder_values(planned.memory["memory_fraction"], worst)
        constraints = {"memory": planned.violation}
        if self.objective.limit is not None:
            constraints["quality"] = 1.0  # never measured; counted as violated
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr(T.A_PLAN_INFEASIBLE, True)
        trial.set_user_attr(T.A_METRICS, planned.memory)
        self.rt.study.tell(trial, values)
        self._record(trial, "COMPLETE", planned.family, planned.params, planned.memory, values, constraints,
                     plan_infeasible=True)

    def _fail(self, trial: Any, family: str, params: dict, error: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(T.A_ERROR, error[:2000])
        self.rt.study.tell(trial, state=TrialState.FAIL)
        self._record(trial, "FAIL", family, params, {}, None, {}, error=error)

    def _record(self, trial, state, family, params, metrics, values, constraints, **flags) -> None:
        rec = T.TrialRecord(trial.number, state, family, dict(params), dict(metrics), values,
                            dict(constraints),
                            preset=trial.user_attrs.get(T.A_PRESET), trial_params=dict(trial.params),
                            plan_key=trial.user_attrs.get(T.A_HASH), **flags)
        self.records.append(rec)
        if rec.evaluated:
            self.since_improvement = 0 if self._improves(rec) else self.since_improvement + 1
        self.rt.tracker.log_record(rec)
        if rec.duplicate_of is not None:
            note = f"duplicate of trial {rec.duplicate_of} (not counted)"
        elif state == "PRUNED":
            note = f"pruned after {int(metrics.get('samples', 0))} images"
        else:
            note = "from cache" if rec.cache_hit else ("over memory target" if rec.plan_infeasible
                                                       else (rec.error or ""))
        if self.view is not None:
            feasible = rec.feasible if state == "COMPLETE" and not rec.plan_infeasible else None
            se = metrics.get(f"{self.cfg.metric}_se")
            if se is not None and state != "FAIL":
                note = f"± {se:.2g}  {note}".rstrip()
            self.view.line(trial_line(trial.number, state, family, metrics, self.cfg.metric, feasible,
                                      note[:120] + (f"  [{rec.preset}]" if rec.preset else "")))

    def _improves(self, rec: T.TrialRecord) -> bool:
        """Update the front with ``rec``; True when it entered (incremental: O(front) per trial)."""
        if not rec.feasible or not rec.values:
            return False
        if not self.objective.multi:
            if self.front and self.front[0].values[0] <= rec.values[0]:
                return False
            self.front = [rec]
            return True

        def dominates(a, b):
            return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

        if any(dominates(m.values, rec.values) or m.values == rec.values for m in self.front):
            return False
        self.front = [m for m in self.front if not dominates(rec.values, m.values)] + [rec]
        return True

    # -- the loop --------------------------------------------------------------------------------------------
    def in_flight(self) -> int:
        return self.rt.evals.waiting

    def finished(self) -> int:
        """Finished trials that count toward ``--trials`` (interrupted ones are retried instead)."""
        return sum(r.counts for r in self.records)

    def snapshot(self, rule: StopRule, note: str = ""):
        from tuner.search.progress import Snapshot

        best = sorted(self.front, key=lambda r: (r.values[-1], r.values[0]))
        if best:
            b = best[0]
            best_text = (f"trial {b.number} {b.family}: "
                         f"memory {b.metrics.get('memory_fraction', float('nan')):.4f}, "
                         f"{self.cfg.metric} {b.metrics.get(self.cfg.metric, float('nan')):.4g}")
        else:
            best_text = "none yet"
        return Snapshot(done=self.finished(), total=self.cfg.trials, running=self.in_flight(),
                        evaluated=sum(r.evaluated and not r.cache_hit for r in self.records),
                        plan_infeasible=sum(r.plan_infeasible for r in self.records),
                        failed=sum(r.state == "FAIL" for r in self.records),
                        cache_hits=sum(r.cache_hit for r in self.records), best=best_text,
                        pruned=sum(r.state == "PRUNED" for r in self.records),
                        duplicates=sum(r.duplicate_of is not None for r in self.records),
                        pareto_size=len(best) if self.objective.multi else min(len(best), 1),
                        workers=self.rt.pool.status(), elapsed_s=rule.elapsed(), note=note)

    def loop(self, rule: StopRule) -> str:
        last_beat = time.monotonic()
        while True:
            while self.rt.pool.idle > 0 and rule.can_ask(self.finished(), self.in_flight(),
                                                         self.since_improvement, self.duplicate_streak):
                self.ask_one()
            reason = rule.reason(self.finished() + self.in_flight(), self.since_improvement,
                                 self.duplicate_streak)
            if reason is not None and not self.in_flight():
                return rule.reason(self.finished(), self.since_improvement, self.duplicate_streak) or reason
            if rule.interrupted:
                return "interrupted"
            for done in self.rt.evals.poll(POLL_S):
                self.complete(done)
            if time.monotonic() - last_beat > HEARTBEAT_S:
                self.rt.tables.heartbeat(self.rt.session_id)
                last_beat = time.monotonic()
            if self.view is not None:
                self.view.update(self.snapshot(rule))

    def abandon_in_flight(self, why: str = "ctrl-c") -> list[int]:
        """Ctrl-C or SIGTERM: fail every running trial and re-queue it for the next run of the same
        command."""
        from optuna.trial import TrialState

        from tuner.search.study import requeue

        numbers = []
        for screening in self.rt.evals.cancel_all():
            trial = screening.trial
            trial.set_user_attr(T.A_INTERRUPTED, why)
            self.rt.study.tell(trial, state=TrialState.FAIL)
            requeue(self.rt.study, trial.params, trial.user_attrs, trial.number)
            numbers.append(trial.number)
        return numbers


def run_search(cfg: SearchConfig, console: Any = None, progress: bool = True) -> SearchResult:
    """Run (or resume) the search described by ``cfg``; see the module docstring for the stages.

    SIGINT and SIGTERM are handled alike from the start: the search stops asking, abandons and
    re-queues what runs, writes its reports, prints the resume command and returns with
    ``interrupted`` set (the CLI exits with 128 + the signal number).
    """
    from tuner.search.export import finish_search
    from tuner.search.prescreen import warm_start

    if console is None:
        import sys

        from rich.console import Console

        console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True)
    rule = StopRule(cfg.trials, cfg.timeout_s, cfg.patience)
    with InterruptFlag(rule) as flag:
        rt = prepare_runtime(cfg, console)
        flag.install()  # ray.init replaced the SIGTERM handler
        status = "FAILED"
        try:
            driver = SearchDriver(rt)
            note = warm_start(rt, cfg.proxy_candidates, cfg.proxy_top)
            if note:
                console.print(note, highlight=False)
            rt.tracker.backfill(driver.records)  # trials an earlier driver finished but could not log
            if driver.finished() >= cfg.trials:
                console.print(f"study {cfg.study_name} already has {driver.finished()} finished trials "
                              f"(--trials {cfg.trials}); raise --trials to search further", highlight=False)
            rule.started = time.monotonic()  # the timeout counts from the first trial, not the model load
            with ProgressView(console, enabled=progress) as view:
                driver.view = view
                reason = driver.loop(rule)
                view.update(driver.snapshot(rule, note=f"stopped: {reason}"))
            interrupted = rule.interrupted
            why = {"SIGTERM": "sigterm"}.get(rule.signal or "", "ctrl-c")
            requeued = driver.abandon_in_flight(why) if interrupted else []
            result = SearchResult(cfg.study_name, cfg.storage, cfg.out_dir, reason, driver.records,
                                  interrupted=interrupted, mlflow_run_id=rt.tracker.run_id,
                                  evaluations=driver.evaluations,
                                  exit_code=rule.exit_code if interrupted else 0)
            finish_search(rt, driver, result, requeued)
            rt.tracker.backfill(driver.records)
            status = "KILLED" if interrupted else "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            rt.close(status)


__all__ = ["run_search", "SearchResult", "SearchDriver"]
