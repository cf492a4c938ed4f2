"""optuna-dashboard on a search's storage (README, optuna-dashboard): the real server on 127.0.0.1 shows the
study with the user attributes the search stores on every trial, and finds the exported trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.search.helpers import config
from tests.search.product_run import free_port

pytestmark = pytest.mark.slow


def _dashboard_bin() -> Path:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed: "
                                                   "pip install -e '.[dashboard]'")
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if not exe.is_file():
        pytest.skip(f"optuna_dashboard is importable but its command {exe} is missing")
    return exe


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def start_dashboard(exe: Path, storage: str, port: int) -> subprocess.Popen:
    """``optuna-dashboard STORAGE --host 127.0.0.1 --port PORT``, answering ``/api/studies``."""
    proc = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port),
                             "--server", "wsgiref", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"optuna-dashboard exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            _get(port, "/api/studies")
            return proc
        except OSError:
            time.sleep(0.3)
    stop_dashboard(proc)
    raise AssertionError("optuna-dashboard did not answer /api/studies in 90 s")


def stop_dashboard(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


def _attrs(items: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in items}


def test_optuna_dashboard_shows_the_study_and_finds_the_exported_trial(tmp_path):
    import optuna

    from tuner.search.driver import run_search
    from tuner.search.study import A_EXPORTED

    exe = _dashboard_bin()
    study_name = "tiny-dashboard"
    # the layout of a default search: runs/<study>/study.db; no presets, so the exported policy is a trial
    cfg = config(tmp_path, out=tmp_path / "runs" / study_name, study_name=study_name, trials=6,
                 presets=False, proxy_candidates=0)
    assert cfg.storage == f"sqlite:///{tmp_path / 'runs' / study_name / 'study.db'}"
    result = run_search(cfg, progress=False)
    assert result.policy_path is not None
    policy = json.loads(result.policy_path.read_text())
    exported = policy["provenance"]["trial"]
    assert exported is not None

    port = free_port()
    proc = start_dashboard(exe, cfg.storage, port)
    try:
        summaries = _get(port, "/api/studies")["study_summaries"]
        (summary,) = [s for s in summaries if s["study_name"] == study_name]
        study_attrs = _attrs(summary["user_attrs"])
        assert json.loads(study_attrs[A_EXPORTED])["trial"] == exported
        assert json.loads(study_attrs[A_EXPORTED])["path"] == str(result.policy_path)
        detail = _get(port, f"/api/studies/{summary['study_id']}")
    finally:
        stop_dashboard(proc)
    assert proc.poll() is not None

    stored = {t.number: t for t in optuna.load_study(study_name=study_name, storage=cfg.storage).trials}
    trials = {t["number"]: t for t in detail["trials"]}
    assert set(trials) == set(stored)
    complete = [n for n, t in trials.items() if t["state"] == "Complete"]
    assert complete
    for n in complete:
        ua = _attrs(trials[n]["user_attrs"])
        assert {"family", "policy_params", "metrics"} <= set(ua)
        assert ua["family"] == stored[n].user_attrs["family"]
        metrics = json.loads(ua["metrics"])
        assert metrics == pytest.approx(stored[n].user_attrs["metrics"])
        assert metrics["memory_fraction"] > 0 and "kv_bytes_per_image" in metrics  # memory: always
        if "plan_infeasible" not in ua:  # evaluated (an over-target plan is told its memory only)
            assert metrics["memory_fraction"] <= 0.4 and "psnr" in metrics
    # the exported trial, as the dashboard shows it, is the policy in the file
    assert exported in trials
    ua = _attrs(trials[exported]["user_attrs"])
    assert ua["family"] == policy["policy"]["family"]
    assert json.loads(ua["metrics"])["memory_fraction"] == pytest.approx(policy["memory"]["fraction"])
    # and the dashboard's own selection (the best trial of a single-objective study) is that trial: with
    # the fake evaluator the held-out ranking equals the screening ranking, and no preset competes
    assert [t["number"] for t in detail["best_trials"]] == [exported]
