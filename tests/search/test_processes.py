"""The search as a real process: SIGKILL of the driver then resume, Ctrl-C, two drivers sharing one
database file at the same time, and the one-line errors of the command line (exit status 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.search.helpers import ROOT, cli_args, config, eval_log, toy_space
from tuner.search.driver import run_search


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def flags(tmp_path, out: str, **kw):
    f = dict(model="tiny", mem_target="60%", space=toy_space(tmp_path), trials=30, workers=0, samples=4,
             final_samples=4, device="cpu", mlflow_uri="none", no_presets=True, no_progress=True,
             evaluator="tests.search.fake_eval:build",
             evaluator_arg={"log": str(tmp_path / f"{Path(out).name}-evals.log"), "sleep": "0.4"},
             out=str(tmp_path / out))
    f.update(kw)
    return f


def as_config(tmp_path, f: dict, **over):
    """The same search as ``f`` (flags), as an in-process config."""
    return config(tmp_path, model=f["model"], mem_target=f["mem_target"], space=f["space"], workers=0,
                  samples=f["samples"], final_samples=f["final_samples"], device="cpu", mlflow_uri="none",
                  presets=False, evaluator=f["evaluator"], evaluator_kwargs=dict(f["evaluator_arg"]),
                  out=f["out"], **over)


def wait_for(study_name, storage, pred, proc, timeout=90.0):
    import optuna

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).trials
        except Exception:  # noqa: BLE001 - not created yet
            trials = []
        if pred(trials):
            return trials
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def evaluated(trials):
    return [t for t in trials if t.state.name == "COMPLETE" and not t.user_attrs.get("plan_infeasible")]


def test_resume_after_sigkill_loses_nothing_and_evaluates_nothing_twice(tmp_path):
    f = flags(tmp_path, "killed")
    cfg = as_config(tmp_path, f, trials=12)
    proc = subprocess.Popen(cli_args(f), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    wait_for(cfg.study_name, cfg.storage,
             lambda ts: len(evaluated(ts)) >= 3 and any(t.state.name == "RUNNING" for t in ts), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import optuna

    before = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage).trials
    done = {t.number: t.values for t in before if t.state.name == "COMPLETE"}
    running = [t.number for t in before if t.state.name == "RUNNING"]
    assert running and done
    # the same command again (in-process), with room for the re-queued trial(s) and a few more
    result = run_search(as_config(tmp_path, f, trials=len(before) + 4), progress=False)
    after = {t.number: t for t in optuna.load_study(study_name=cfg.study_name, storage=cfg.storage).trials}
    for number, values in done.items():  # no completed trial lost
        assert after[number].state.name == "COMPLETE" and after[number].values == values
    for number in running:  # the killed driver's trial failed and came back as a retry
        assert after[number].state.name == "FAIL" and after[number].user_attrs["interrupted"] == "driver gone"
        assert any(t.user_attrs.get("retry_of") == number and t.state.name == "COMPLETE"
                   for t in after.values())
    assert not any(t.state.name == "RUNNING" for t in after.values())
    log = [e for e in eval_log(cfg) if e["seed"] == cfg.seed]  # screening (final runs use held-out seeds)
    counts = {}
    for e in log:
        key = json.dumps(e["params"], sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    for number in done:  # policies completed before the kill were never evaluated again
        if not after[number].user_attrs.get("plan_infeasible"):
            assert counts[json.dumps(after[number].user_attrs["policy_params"], sort_keys=True)] == 1
    assert result.policy_path is not None


def test_ctrl_c_finishes_cleanly_with_a_resume_hint(tmp_path):
    f = flags(tmp_path, "interrupted", evaluator_arg={"log": str(tmp_path / "i.log"), "sleep": "1.0"})
    cfg = as_config(tmp_path, f, trials=30)
    proc = subprocess.Popen(cli_args(f), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(cfg.study_name, cfg.storage,
             lambda ts: len(evaluated(ts)) >= 2 and any(t.state.name == "RUNNING" for t in ts), proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    hint = next(line for line in output.splitlines()
                if line.startswith("resume with: tuner search --model tiny "))
    assert f" --study-name {cfg.study_name} " in hint and f" --storage {cfg.storage} " in hint
    import optuna

    trials = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage).trials
    states = [t.state.name for t in trials]
    failed = [t.number for t in trials if t.user_attrs.get("interrupted") == "ctrl-c"]
    waiting = [t.user_attrs["retry_of"] for t in trials if t.state.name == "WAITING"]
    # the evaluation running at Ctrl-C was aborted (1 s of fake work; the signal lands inside it almost
    # always): its trial is FAIL and re-queued for the resume
    assert f"interrupted: {len(failed)} running trial(s) marked FAIL and re-queued" in output
    assert "RUNNING" not in states and waiting == failed and len(failed) <= 1
    assert (cfg.out_dir / "pareto.csv").exists()


def test_two_drivers_share_one_database_file(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    fa = flags(tmp_path, "a", storage=storage, trials=6, mem_target="60%",
               evaluator_arg={"log": str(tmp_path / "a.log"), "sleep": "0.1"})
    fb = flags(tmp_path, "b", storage=storage, trials=6, mem_target="70%",
               evaluator_arg={"log": str(tmp_path / "b.log"), "sleep": "0.1"})
    procs = [subprocess.Popen(cli_args(x), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for x in (fa, fb)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    import optuna

    from tests.search.helpers import counted

    summaries = {name: len(counted(optuna.load_study(study_name=name, storage=storage).trials))
                 for name in ("tiny-toy-mem60pct", "tiny-toy-mem70pct")}
    assert summaries == {"tiny-toy-mem60pct": 6, "tiny-toy-mem70pct": 6}
    assert all("policy written to" in o for o in outputs)


@pytest.mark.parametrize("extra, message", [
    ({"mem_target": "0"}, "error: --mem-target '0'"),
    ({"mem_target": "150%"}, "error: --mem-target '150%'"),
    ({"mem_target": "abc"}, "error: --mem-target 'abc'"),
    ({"model": "d99"}, "error: --model 'd99' is unknown"),
    ({"sampler": "cmaes"}, "error: --sampler 'cmaes' is not one of"),
    ({"family": "nope", "space": None}, "error: --family 'nope' is not one of"),
    ({"mlflow_uri": "http://127.0.0.1:1"}, "error: --mlflow-uri http://127.0.0.1:1 is unreachable"),
    ({"ray_address": "auto", "workers": 1}, "error: --ray-address auto: no running Ray cluster found"),
    ({"ray_address": "127.0.0.1:1", "workers": 1}, "error: --ray-address 127.0.0.1:1: nothing listens there"),
])
def test_command_line_errors_are_one_line_and_write_no_study(tmp_path, extra, message):
    f = flags(tmp_path, "bad")
    f.update(extra)
    f = {k: v for k, v in f.items() if v is not None}
    env_ = env()
    env_.pop("RAY_ADDRESS", None)
    # where `auto` looks: empty, whatever else runs on this machine
    env_["RAY_TMPDIR"] = str(tmp_path / "ray")
    res = subprocess.run(cli_args(f), cwd=ROOT, env=env_, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "bad" / "study.db").exists()
