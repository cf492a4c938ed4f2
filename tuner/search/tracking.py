"""MLflow tracking of searches (docs/design.md, Tracking and export): experiment per model, parent run per
study, child per trial.

Uses :class:`mlflow.tracking.MlflowClient` with explicit run ids (no fluent global run stack), so the
driver can log trials as they finish in any order. Metric names are the evaluator's keys verbatim
(``memory_fraction``, ``fid_vs_full``, ``psnr`` …) plus ``objective_<i>`` and ``constraint_<name>``;
every run carries the tag ``tuner.study`` so a study's runs are one filter away:
``mlflow.search_runs(filter_string="tags.`tuner.study` = 'NAME'")``.

When the study run ends, the feasible trials not dominated on (memory_fraction, quality metric) get the tag
``tuner.pareto = true`` and the parent run gets the front as metrics, so two studies' fronts compare in the
MLflow UI: ``pareto.size`` and, per front point, ``pareto.memory_fraction`` and ``pareto.<metric>`` logged at
step = memory fraction in per mille (a line chart of ``pareto.<metric>`` over steps is the front).

Every finished trial gets exactly one child run: :meth:`MlflowTracker.backfill` logs the trials that a
killed driver or an MLflow outage left without one (it looks the study's child runs up first), and the
search wraps the tracker in :class:`tuner.search.tracker_guard.GuardedTracker` so an outage never stops
or hangs it. HTTP requests are bounded (:data:`HTTP_ENV`); a SQLite store is initialised under a lock,
so two searches starting on a fresh store do not race through its schema migrations.

``--mlflow-uri none`` disables tracking (:class:`NullTracker`). mlflow is imported only here, inside
functions.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.provenance import git_sha

STUDY_TAG = "tuner.study"
PARETO_TAG = "tuner.pareto"
MAX_PARAM_CHARS = 6000
# MLflow's defaults retry a failed HTTP request 7 times with exponential backoff and wait 120 s per
# attempt: one call to a stopped server then blocks the search for minutes. These bound it to seconds;
# the guard (tuner.search.tracker_guard) skips tracking while the server is down and fills the gap later.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
            # a "View run ... at: URL" line on stdout for every finished trial run would drown the trial lines
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def check_tracking_uri(uri: str) -> None:
    """Fail fast (UserError) when the tracking store cannot be reached; writes nothing."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - user-given server
                if resp.status != 200:
                    raise UserError(f"--mlflow-uri {uri}: /health answered HTTP {resp.status}; "
                                    f"check the MLflow server")
        except urllib.error.HTTPError as exc:
            raise UserError(f"--mlflow-uri {uri}: /health answered HTTP {exc.code}; "
                            f"check the MLflow server") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"--mlflow-uri {uri} is unreachable ({reason}); start the server "
                            f"(mlflow server --host 127.0.0.1 --port 5000) or pass "
                            f"--mlflow-uri none") from None
        return
    if uri.startswith(("sqlite", "postgresql", "mysql", "mssql")):
        from tuner.search.storage import check_storage_url

        check_storage_url(uri, flag="--mlflow-uri")
        return
    if uri.startswith("file:") or "://" not in uri:
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise UserError(f"--mlflow-uri {uri}: MLflow's file store is disabled; use sqlite:///mlflow.db "
                            f"or an http:// server (or set MLFLOW_ALLOW_FILE_STORE=true)")
        return
    # Other schemes (databricks, ...): let MLflow judge at the first call.


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Raise the given loggers to WARNING for the block (restored afterwards)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[key] = v
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_PARAM_CHARS]


def record_payload(rec: Any) -> dict[str, Any]:
    """``log_trial`` keyword arguments of a :class:`tuner.search.trials.TrialRecord`."""
    tags = {"tuner.family": rec.family or "", "tuner.preset": rec.preset or "",
            "tuner.plan_infeasible": rec.plan_infeasible, "tuner.cache_hit": rec.cache_hit,
            "tuner.duplicate_of": "" if rec.duplicate_of is None else rec.duplicate_of}
    if rec.error:
        tags["tuner.error"] = rec.error[:500]
    metrics = dict(rec.metrics)
    metrics.update({f"objective_{i}": v for i, v in enumerate(rec.values or [])})
    metrics.update({f"constraint_{k}": v for k, v in rec.constraints.items()})
    params = {**rec.trial_params, **{f"policy.{k}": v for k, v in rec.params.items()}}
    return {"params": params, "metrics": metrics, "tags": tags,
            "state": "INFEASIBLE" if rec.plan_infeasible else rec.state}


def needs_run(rec: Any) -> bool:
    """Trials that get a child run: every finished one except those cut short (they are retried)."""
    return rec.state in ("COMPLETE", "FAIL", "PRUNED") and rec.interrupted is None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Exclusive lock on a SQLite store's directory while MLflow creates or migrates its schema.

    Two searches started together on a fresh store otherwise both run alembic's migrations and one
    fails. The lock is an ``flock`` on the directory itself: no lock file is left behind.
    """
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    directory = Path(path).resolve().parent
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class NullTracker:
    """Tracking disabled: every call is a no-op."""

    run_id: str | None = None
    enabled = False

    def start_study(self, *args: Any, **kwargs: Any) -> str | None:
        return None

    def log_trial(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def backfill(self, *args: Any, **kwargs: Any) -> list[int]:
        return []

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self, *args: Any, **kwargs: Any) -> None:
        pass


class MlflowTracker:
    """Parent run = study, nested child runs = trials, all through one :class:`MlflowClient`."""

    enabled = True

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # The first use of a SQLite store migrates its schema (and logs it); the experiment is created
        # under the same lock, so a concurrent search finds it instead of failing on the unique name.
        with _store_lock(uri), _quiet("mlflow.store.db.utils", "alembic"):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                self.experiment_id = self._create_experiment(experiment, location)
            elif exp.lifecycle_stage == "deleted":
                raise UserError(f"--experiment {experiment!r} is deleted in {uri}; restore it or choose "
                                f"another name")
            else:
                self.experiment_id = exp.experiment_id
        self.experiment = experiment
        self.run_id: str | None = None
        self.study_name = ""
        self.metric = "fid_vs_full"

    def _create_experiment(self, name: str, location: str | None) -> str:
        """Create ``name``; a search that created it a moment earlier (another process, same server) wins."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_study(self, study_name: str, config: dict[str, Any], *, space_file: str | None = None,
                    model_hash: str = "", resume_run_id: str | None = None) -> str:
        """Open (or reopen, on resume) the parent run and log the resolved config and provenance."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        self.study_name = study_name
        self.metric = str(config.get("metric") or self.metric)
        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.run_id = resume_run_id
                    return resume_run_id
            except MlflowException:
                pass
        tags = {STUDY_TAG: study_name, "tuner.role": "study", "tuner.model": str(config.get("model")),
                "tuner.checkpoint_sha256": model_hash, "mlflow.source.git.commit": git_sha() or "none"}
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(f"config.{k}", _param_value(v)) for k, v in sorted(config.items()) if v is not None]
        self.client.log_batch(self.run_id, params=params, tags=[RunTag("tuner.git_sha", git_sha() or "none")])
        self.client.log_dict(self.run_id, config, "config.json")
        if space_file:
            self.client.log_artifact(self.run_id, space_file, artifact_path="search_space")
        return self.run_id

    def log_trial(self, number: int, *, params: dict[str, Any], metrics: dict[str, Any], state: str,
                  tags: dict[str, Any] | None = None) -> str:
        """One finished trial as a child run of the study run (params, every metric, final state)."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        all_tags = {"mlflow.parentRunId": self.run_id, STUDY_TAG: self.study_name, "tuner.role": "trial",
                    "tuner.trial": str(number), "tuner.state": state}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=all_tags)
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in sorted(_finite(metrics).items())],
            params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])
        status = "FINISHED" if state in ("COMPLETE", "INFEASIBLE") else "FAILED"
        self.client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    def log_record(self, rec: Any) -> str | None:
        """The child run of a finished :class:`~tuner.search.trials.TrialRecord` (none for retried ones)."""
        if not needs_run(rec):
            return None
        return self.log_trial(rec.number, **record_payload(rec))

    def logged_trials(self) -> set[int]:
        """Trial numbers that have a child run under the study run."""
        return {int(r.data.tags["tuner.trial"]) for r in self._child_runs()
                if r.data.tags.get("tuner.trial", "").isdigit()}

    def _child_runs(self) -> list[Any]:
        """The study run's child runs (its trials, resumed sessions included)."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=50000)

    def backfill(self, records: list[Any]) -> list[int]:
        """Log every record that should have a child run and has none; returns their trial numbers."""
        if self.run_id is None:
            return []
        have = self.logged_trials()
        missing = [r for r in records if needs_run(r) and r.number not in have]
        for rec in missing:
            self.log_record(rec)
        return [r.number for r in missing]

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id,
                              metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def trial_run_id(self, number: int) -> str | None:
        """The child run of trial ``number`` under the study run, or None."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`tuner.trial` = '{number}'")
        return runs[0].info.run_id if runs else None

    def log_image(self, path: str | Path, *, key: str | None, artifact_path: str,
                  trial: int | None = None) -> bool:
        """A PNG as an artifact under ``artifact_path`` and, unless ``key`` is None, as image ``key`` (the
        compare view's image charts) on the study run, or on trial ``trial``'s run; False when that trial
        has no run."""
        from PIL import Image

        run_id = self.run_id if trial is None else self.trial_run_id(trial)
        if run_id is None:
            return False
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        if key is not None:
            with Image.open(path) as img:
                self.client.log_image(run_id, img.convert("RGB"), key=key)
        return True

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            try:
                self.log_pareto_front()
            except Exception as exc:  # noqa: BLE001 - a tracking extra must not fail the search
                logging.getLogger(__name__).warning("could not log the Pareto front to MLflow: %s", exc)
            self.client.set_terminated(self.run_id, status=status)

    def log_pareto_front(self) -> list[int]:
        """Tag the study's front trials (all its child runs, resumed sessions included) and log the front on
        the parent run; returns the front's trial numbers, by increasing memory."""
        from mlflow.entities import Metric

        from tuner.quality.metric_info import METRICS
        from tuner.search.objective import pareto_front

        sign = -1.0 if self.metric in METRICS and METRICS[self.metric].higher_is_better else 1.0
        points = []
        for run in self._child_runs():
            m, tags = run.data.metrics, run.data.tags
            feasible = tags.get("tuner.state") == "COMPLETE" and all(
                v <= 0 for k, v in m.items() if k.startswith("constraint_"))
            if feasible and "memory_fraction" in m and self.metric in m:
                points.append((run, [m["memory_fraction"], sign * m[self.metric]]))
        front = sorted(pareto_front(points), key=lambda r: r.data.metrics["memory_fraction"])
        now = int(time.time() * 1000)
        metrics = [Metric("pareto.size", float(len(front)), now, 0)]
        for run in front:
            self.client.set_tag(run.info.run_id, PARETO_TAG, "true")
            mem = run.data.metrics["memory_fraction"]
            step = int(round(mem * 1000))
            metrics += [Metric("pareto.memory_fraction", mem, now, step),
                        Metric(f"pareto.{self.metric}", run.data.metrics[self.metric], now, step)]
        self.client.log_batch(self.run_id, metrics=metrics)
        return [int(run.data.tags["tuner.trial"]) for run in front]


def open_tracker(uri: str, experiment: str, artifact_root: Path | None) -> MlflowTracker | NullTracker:
    """The tracker for ``--mlflow-uri`` (``none`` → :class:`NullTracker`)."""
    if uri.lower() in ("none", "off"):
        return NullTracker()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    local = uri.startswith("sqlite") or uri.startswith("file:")
    return MlflowTracker(uri, experiment, artifact_root if local else None)
