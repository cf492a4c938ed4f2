"""Faults a search survives, on the product CLI: ``python -m tuner search`` in a subprocess with real
local Ray workers, the real tiny evaluator (2 images per trial), the paper presets and MLflow.

Every test ends with :meth:`ProductSearch.assert_whole`: the asked number of COMPLETE trials, none
RUNNING, no (plan, eval spec) evaluated twice (the study's evaluation log), exactly one MLflow run per
COMPLETE trial, and no process left alive below any search that ran (psutil, orphans included).
"""
from __future__ import annotations

import signal
import threading

import pytest

from tests.search.product_run import (ProductSearch, evaluated, free_port, non_loopback_listeners, running,
                                      start_mlflow_server, stop_mlflow_server)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]


@pytest.fixture
def search(tmp_path):
    s = ProductSearch(tmp_path)
    yield s
    s.cleanup()


def test_local_cluster_listens_on_loopback_only_and_survives_a_killed_worker(search):
    """The cluster `tuner search` starts has no socket reachable from another machine; a worker killed
    from outside is replaced and its trial retried."""
    proc = search.start()
    listeners: set = set()

    def look(p):
        listeners.update(non_loopback_listeners({p.pid} | {c.pid for c in search.descendants(p)}))

    search.watch(proc, lambda ts: evaluated(ts) >= 2 and running(ts), on_tick=look)
    workers = [p for p in search.descendants(proc) if "WorkerHost" in " ".join(p.cmdline())]
    assert workers, [" ".join(p.cmdline())[:80] for p in search.descendants(proc)]
    look(proc)
    workers[0].kill()
    search.watch(proc, lambda ts: False, until_exit=True, on_tick=look)
    output = search.output(proc)
    assert proc.returncode == 0, output[-3000:]
    assert "policy written to" in output
    assert listeners == set(), listeners
    search.assert_whole()


def test_driver_sigkill_then_the_identical_command(search):
    proc = search.start()
    search.watch(proc, lambda ts: evaluated(ts) >= 3 and running(ts))
    proc.kill()
    proc.wait()
    search.assert_no_leftovers()  # Ray's processes go with their driver
    # what the killed driver left RUNNING (almost always 1; 0 when its trial finished just before the kill)
    left_running = [t.number for t in search.trials_now() if t.state.name == "RUNNING"]
    code, output = search.run()
    assert code == 0, output[-3000:]
    if left_running:
        assert f"re-queued {len(left_running)} trial(s) left running by an earlier driver" in output
    search.assert_whole()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_cleanly_then_the_identical_command_finishes(search, sig, code):
    proc = search.start()
    search.watch(proc, lambda ts: evaluated(ts) >= 2 and running(ts))
    proc.send_signal(sig)
    proc.wait(timeout=120)
    output = search.output(proc)
    assert proc.returncode == code, output[-3000:]
    assert "resume with: tuner search " in output and "Traceback" not in output
    assert "SIGTERM received" not in output and "*** " not in output  # no Ray C++ stack dump
    assert not running(search.trials_now())
    search.assert_no_leftovers()
    code, output = search.run()
    assert code == 0, output[-3000:]
    search.assert_whole()


def test_mlflow_server_stopped_mid_search(tmp_path):
    """The search goes on while the server is down (bounded retries, a warning), and the identical
    command after the server is back logs every trial the outage missed."""
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    search = ProductSearch(tmp_path, mlflow=f"http://127.0.0.1:{port}", trials=10)
    try:
        proc = search.start()
        search.watch(proc, lambda ts: evaluated(ts) >= 2)
        stop_mlflow_server(server)
        search.watch(proc, lambda ts: False, until_exit=True, timeout=600)
        output = search.output(proc)
        assert proc.returncode == 0, output[-3000:]
        assert "warning: MLflow tracking failed" in output and "policy written to" in output
        server = start_mlflow_server(tmp_path, port)
        code, output = search.run()
        assert code == 0, output[-3000:]
        search.assert_whole()
    finally:
        stop_mlflow_server(server)
        search.cleanup()


def test_two_searches_started_together_on_fresh_shared_stores(tmp_path):
    """One study database and one MLflow SQLite store, both new, two studies at once."""
    storage, mlflow = f"sqlite:///{tmp_path / 'shared.db'}", f"sqlite:///{tmp_path / 'shared-mlflow.db'}"
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(ProductSearch(tmp_path / name, storage=storage, mlflow=mlflow, trials=6,
                                  study=f"faults-{name}"))
    try:
        procs = [r.start() for r in runs]
        threads = [threading.Thread(target=r.watch, args=(p, lambda ts: False), kwargs={"until_exit": True})
                   for r, p in zip(runs, procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs = [r.output(p) for r, p in zip(runs, procs)]
        assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
        assert all("Traceback" not in o for o in outputs)
        for r in runs:
            r.assert_whole()
    finally:
        for r in runs:
            r.cleanup()
