"""A search tracked by a real ``mlflow server`` on 127.0.0.1 (started and stopped here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.search.helpers import config
from tests.search.product_run import free_port, start_mlflow_server, stop_mlflow_server
from tuner.search.driver import run_search

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


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
