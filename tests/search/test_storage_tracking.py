"""Our SQL tables beside Optuna's, storage/tracking URL checks, and MLflow parent/child runs."""
from __future__ import annotations

import os

import pytest

from tuner.errors import UserError
from tuner.search.storage import ExportRecord, TunerTables, check_storage_url, open_optuna_storage


def test_tables_live_beside_optuna_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_optuna_storage(url)
    tables = TunerTables(url)
    import sqlalchemy

    names = set(sqlalchemy.inspect(tables.engine).get_table_names())
    assert {"studies", "trials", "tuner_eval_cache", "tuner_exported_policies", "tuner_sessions"} <= names
    assert tables.cached_metrics("m", "p", "e") is None
    tables.store_metrics("m", "p", "e", "ams", {"a": 1}, {"psnr": 30.5}, 1.0)
    tables.store_metrics("m", "p", "e", "ams", {"a": 1}, {"psnr": 99.0})  # duplicate key: first write wins
    assert tables.cached_metrics("m", "p", "e") == {"psnr": 30.5}
    assert tables.cached_metrics("m", "p", "other-spec") is None
    assert tables.cache_size("m") == 1 and tables.cache_size("x") == 0
    tables.record_export(ExportRecord("s", 3, "/x/p.json", "p", "m", {"psnr": 30.5}, None))
    [rec] = tables.exports("s")
    assert (rec.trial_number, rec.path, rec.metrics) == (3, "/x/p.json", {"psnr": 30.5})
    tables.close()


def test_sessions_alive_by_pid_and_dead_when_process_is_gone(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'study.db'}"
    tables = TunerTables(url)
    tables.open_session("me", "s")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with tables.engine.begin() as conn:  # a session of a driver process that has exited
        conn.execute(tables.sessions.insert().values(session_id="gone", study_name="s",
                                                     host=os.uname().nodename,
                                                     pid=proc.pid, heartbeat=0.0, finished=0))
    assert tables.live_sessions("s") == {"me"}
    tables.heartbeat("me", finished=True)
    assert tables.live_sessions("s") == set()
    tables.close()


def test_storage_url_checks_write_nothing(tmp_path):
    check_storage_url(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'study.db'}")  # creatable: fine
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="not a usable SQLAlchemy URL"):
        check_storage_url("nosuchdialect://x/y")
    with pytest.raises(UserError, match="driver is not installed|cannot connect"):
        check_storage_url("postgresql://nobody@127.0.0.1:1/db")  # no driver here, or nothing on port 1
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match="cannot be created or written"):
        check_storage_url(f"sqlite:///{a_file / 'study.db'}")
    blocked = tmp_path / "ro"
    blocked.mkdir()
    blocked.chmod(0o500)
    try:
        if not os.access(blocked, os.W_OK):  # root ignores permissions; the file case above covers it
            with pytest.raises(UserError, match="cannot be created or written"):
                check_storage_url(f"sqlite:///{blocked / 'study.db'}")
    finally:
        blocked.chmod(0o700)


def test_tracking_uri_checks(tmp_path):
    from tuner.search.tracking import check_tracking_uri

    with pytest.raises(UserError, match=r"--mlflow-uri http://127.0.0.1:1 is unreachable"):
        check_tracking_uri("http://127.0.0.1:1")
    with pytest.raises(UserError, match="file store is disabled"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_parent_and_child_runs(tmp_path):
    import mlflow

    from tuner.search.tracking import STUDY_TAG, open_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = open_tracker(uri, "varkv-test", tmp_path / "art")
    space = tmp_path / "space.yaml"
    space.write_text("families: {}\n")
    run_id = tr.start_study("st", {"model": "tiny", "trials": 3}, space_file=str(space), model_hash="abc")
    tr.log_trial(0, params={"ams.window": 2},
                 metrics={"psnr": 31.0, "memory_fraction": 0.2, "bad": float("nan")},
                 state="COMPLETE", tags={"tuner.family": "ams"})
    tr.log_trial(1, params={}, metrics={}, state="FAIL")
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG")
    tr.log_artifact(png, "pareto")
    tr.finish("FINISHED")
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("varkv-test")
    assert exp.artifact_location == (tmp_path / "art").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = 'st'")
    assert len(runs) == 3
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["tags.`tuner.trial` ASC"])
    assert [c.data.tags["tuner.state"] for c in children] == ["COMPLETE", "FAIL"]
    assert children[0].data.metrics == {"psnr": 31.0, "memory_fraction": 0.2}
    assert children[0].data.params == {"ams.window": "2"}
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]
    parent = client.get_run(run_id)
    assert parent.data.params["config.trials"] == "3" and parent.data.tags["tuner.checkpoint_sha256"] == "abc"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "search_space", "pareto"} <= arts
    # resuming reopens the same parent run
    tr2 = open_tracker(uri, "varkv-test", tmp_path / "art")
    assert tr2.start_study("st", {"model": "tiny"}, resume_run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"


def test_mlflow_pareto_front_on_parent_and_tags(tmp_path):
    """finish() tags the feasible non-dominated trials and logs the front on the parent (to compare
    studies)."""
    import mlflow

    from tuner.search.tracking import PARETO_TAG, open_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = open_tracker(uri, "varkv-test", tmp_path / "art")
    run_id = tr.start_study("front", {"model": "tiny", "metric": "psnr"})
    trials = [  # (memory_fraction, psnr, state, constraint_memory)
        (0.10, 20.0, "COMPLETE", -0.05), (0.12, 19.0, "COMPLETE", -0.03),  # 1 dominated (psnr is maximised)
        (0.14, 25.0, "COMPLETE", -0.01), (0.09, 30.0, "COMPLETE", 0.02),   # 3 violates the constraint
        (0.30, None, "INFEASIBLE", 0.2), (0.05, None, "FAIL", None)]
    for i, (mem, psnr, state, c) in enumerate(trials):
        metrics = {"memory_fraction": mem, "psnr": psnr, "constraint_memory": c}
        tr.log_trial(i, params={}, metrics={k: v for k, v in metrics.items() if v is not None}, state=state)
    tr.finish("FINISHED")
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("varkv-test")
    tagged = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARETO_TAG}` = 'true'")
    assert sorted(r.data.tags["tuner.trial"] for r in tagged) == ["0", "2"]
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["pareto.size"] == 2
    hist = client.get_metric_history(run_id, "pareto.psnr")
    assert sorted((m.step, m.value) for m in hist) == [(100, 20.0), (140, 25.0)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "pareto.memory_fraction")) == [100, 140]
