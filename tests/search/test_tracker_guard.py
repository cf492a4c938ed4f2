"""MLflow outages never stop a search: the guard skips while down, refills the gap when back, and
backfill logs exactly the trials that have no run (real MlflowClient on SQLite)."""
from __future__ import annotations

import pytest

from tuner.search.tracker_guard import RETRY_S, GuardedTracker
from tuner.search.trials import TrialRecord


class Flaky:
    """A tracker whose calls fail while ``down`` is set; records what got through."""

    run_id, enabled = "run", True

    def __init__(self):
        self.down, self.logged, self.calls = False, [], 0

    def log_record(self, rec):
        self.calls += 1
        if self.down:
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/create")
        self.logged.append(rec.number)

    def finish(self, status):
        self.calls += 1
        if self.down:
            raise ConnectionError("Connection refused")


def rec(n, state="COMPLETE", **kw):
    return TrialRecord(n, state, "ams", {"window": 1}, {"memory_fraction": 0.1, "psnr": 20.0}, [0.1], {},
                       **kw)


def test_outage_is_skipped_without_waiting_and_the_gap_is_logged_when_back():
    now = [0.0]
    inner, warnings = Flaky(), []
    guard = GuardedTracker(inner, warnings.append, clock=lambda: now[0])
    guard.log_record(rec(0))
    inner.down = True
    guard.log_record(rec(1))  # fails: one warning, tracking down
    for n in (2, 3, 4):  # within the retry interval: not even tried
        now[0] += 1.0
        guard.log_record(rec(n))
    assert inner.calls == 2 and len(warnings) == 1 and "server unreachable" in warnings[0]
    inner.down = False
    now[0] += RETRY_S
    guard.log_record(rec(5))
    assert inner.logged == [0, 5, 1, 2, 3, 4] and not guard.down
    assert "logging 4 trial(s) it missed" in warnings[-1]


def test_a_failed_finish_says_how_to_fill_the_gap():
    inner, warnings = Flaky(), []
    guard = GuardedTracker(inner, warnings.append)
    inner.down = True
    guard.finish("FINISHED")
    assert "re-run the same command when the server is back" in warnings[-1]


@pytest.fixture
def tracker(tmp_path):
    from tuner.search.tracking import MlflowTracker

    t = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "art")
    t.start_study("s", {"metric": "psnr"})
    return t


def test_backfill_logs_only_the_trials_without_a_run_once(tracker):
    records = [rec(0), rec(1), rec(2, state="FAIL", error="boom"), rec(3, state="FAIL", interrupted="ctrl-c")]
    tracker.log_record(records[0])
    assert tracker.backfill(records) == [1, 2]  # the interrupted one is retried, not logged
    assert tracker.backfill(records) == []
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.`tuner.role` = 'trial'")
    assert sorted(int(r.data.tags["tuner.trial"]) for r in runs) == [0, 1, 2]
    failed = [r for r in runs if r.data.tags["tuner.trial"] == "2"][0]
    assert failed.info.status == "FAILED" and failed.data.tags["tuner.error"] == "boom"
