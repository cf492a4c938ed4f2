"""A search tracked by a real ``mlflow server`` on 127.0.0.1 (started and stopped here)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.search.helpers import config
from tuner.search.driver import run_search

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                             "--artifacts-destination", str(tmp_path / "srv-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, "mlflow server exited"
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health in 90 s")
    yield uri
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_search_logs_to_an_mlflow_server(tmp_path, mlflow_server):
    import mlflow

    cfg = config(tmp_path, trials=5, mlflow_uri=mlflow_server, experiment="srv-test", presets=False)
    result = run_search(cfg, progress=False)
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("srv-test")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`tuner.study` = '{cfg.study_name}'")
    assert len(runs) == 6
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.mlflow_run_id]
    assert sorted(int(r.data.tags["tuner.trial"]) for r in children) == list(range(5))
    arts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.json", "pareto", "policy"} <= arts
    local = client.download_artifacts(result.mlflow_run_id, "policy", str(tmp_path / "dl"))
    assert any(Path(local).iterdir())
