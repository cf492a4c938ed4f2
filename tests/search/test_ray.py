"""Real local Ray with 2 CPU actors: parallel evaluation, a killed actor, a hung actor, a trial whose
actor dies twice (FAIL), all with the fake evaluator on the toy space."""
from __future__ import annotations

import os

import pytest

from tests.search.helpers import config, eval_log, toy_space
from tuner.search.driver import run_search

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


def space_with_tags(tmp_path, tags):
    return toy_space(tmp_path, "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 5}\n"
                               f"      tag: {{type: categorical, choices: {tags}}}\n")


def test_two_cpu_actors_share_the_work(tmp_path, ray_cluster):
    cfg = config(tmp_path, workers=2, trials=10, mem_target="70%", presets=False,
                 evaluator_kwargs={"sleep": "0.3"})
    result = run_search(cfg, progress=False)
    assert sum(r.counts for r in result.records) == 10 and all(r.state == "COMPLETE" for r in result.records)
    pids = {e["pid"] for e in eval_log(cfg)}
    assert len(pids) == 2 and os.getpid() not in pids
    assert result.policy_path is not None


def test_killed_actor_trial_is_retried_and_search_completes(tmp_path, ray_cluster):
    marker = tmp_path / "crashed"
    cfg = config(tmp_path, workers=2, trials=6, mem_target="70%", presets=False,
                 space=space_with_tags(tmp_path, "[crash]"), evaluator_kwargs={"crash_once": str(marker)})
    result = run_search(cfg, progress=False)
    assert marker.exists()  # one actor really died mid-trial
    dead_pid = int(marker.read_text())
    assert all(r.state == "COMPLETE" for r in result.records)
    log = eval_log(cfg)
    assert log and dead_pid not in {e["pid"] for e in log}
    screened = [e for e in log if e["seed"] == cfg.seed]
    assert len(screened) == len({str(e["params"]) for e in screened})  # the retry ran once, elsewhere


def test_hung_actor_is_replaced(tmp_path, ray_cluster):
    marker = tmp_path / "hung"
    cfg = config(tmp_path, workers=1, trials=3, mem_target="70%", presets=False, trial_timeout_s=4.0,
                 space=space_with_tags(tmp_path, "[hang]"), evaluator_kwargs={"hang_once": str(marker)})
    result = run_search(cfg, progress=False)
    assert marker.exists()
    assert all(r.state == "COMPLETE" for r in result.records)


def test_actor_dying_twice_fails_the_trial_only(tmp_path, ray_cluster):
    cfg = config(tmp_path, workers=1, trials=4, mem_target="70%", presets=False,
                 space=space_with_tags(tmp_path, "[a, crash_always]"))
    result = run_search(cfg, progress=False)
    states = {r.params["tag"]: set() for r in result.records}
    for r in result.records:
        states[r.params["tag"]].add(r.state)
    assert states.get("crash_always") == {"FAIL"}
    failed = [r for r in result.records if r.state == "FAIL"]
    assert all("worker died" in r.error and "after 2 attempts" in r.error for r in failed)
    assert sum(r.counts for r in result.records) == 4


def test_worker_start_errors_reach_the_user_before_any_study(tmp_path, ray_cluster):
    from tuner.errors import UserError

    cfg = config(tmp_path, workers=1, evaluator="tests.search.fake_eval:build_missing_weights")
    with pytest.raises(UserError, match="^checkpoint var_d30.pth not found in /nowhere"):
        run_search(cfg, progress=False)
    assert not (cfg.out_dir / "study.db").exists()
