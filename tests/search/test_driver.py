"""The search driver end to end, in-process (``--workers 0``) with the fake evaluator on the toy space:
ask/tell, planner-infeasible trials, evaluation cache, presets, resume, export, reports, MLflow."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.search.helpers import config, counted, eval_log, toy_space
from tuner.errors import UserError
from tuner.search import study as study_mod
from tuner.search.driver import run_search
from tuner.search.study import Preset


@pytest.fixture
def toy_presets(monkeypatch):
    presets = [Preset("toy-w3", "toy", {"window": 3, "odd_layers_half": True, "tag": "a"}),
               Preset("toy-w9", "toy",
                      {"window": 9, "odd_layers_half": False, "tag": "a"})]  # outside the space
    monkeypatch.setattr(study_mod, "load_presets", lambda model_cfg, calibration=None: presets)
    return presets


def load(cfg):
    import optuna

    return optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)


def screening(cfg, log):
    return [e for e in log if e["seed"] == cfg.seed]  # final re-evaluations use held-out seeds


def test_search_end_to_end(tmp_path, toy_presets):
    import mlflow

    cfg = config(tmp_path, trials=12, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_search(cfg, progress=False)
    study = load(cfg)
    trials = study.trials
    assert len(counted(trials)) == 12 and all(t.state.name == "COMPLETE" for t in trials)
    # a trial the sampler proposed again is answered from the cache and does not count
    first: dict[str, int] = {}
    for t in trials:
        if t.user_attrs.get("plan_infeasible"):
            continue
        earliest = first.setdefault(t.user_attrs["policy_hash"], t.number)
        assert t.user_attrs.get("duplicate_of") == (None if earliest == t.number else earliest)
    # the in-space preset is the first trial, evaluated exactly as given
    assert trials[0].user_attrs["preset"] == "toy-w3"
    assert trials[0].params == {"toy.window": 3, "toy.odd_layers_half": True, "toy.tag": "a"}
    # every trial has its constraint; planner-rejected trials were never evaluated
    log = eval_log(cfg)
    evaluated = Counter(json.dumps(e["params"], sort_keys=True) for e in screening(cfg, log))
    assert max(evaluated.values()) == 1  # identical policies are never evaluated twice
    for t in trials:
        key = json.dumps(t.user_attrs["policy_params"], sort_keys=True)
        assert "memory" in t.constraints
        if t.user_attrs.get("plan_infeasible"):
            assert t.constraints["memory"] > 0 and key not in evaluated
        else:
            assert key in evaluated
    assert result.evaluations == len(evaluated)
    # export: the winner is feasible and the best screened candidate's policy; table rows in order
    assert result.policy_path is not None and result.policy_path.is_file()
    names = [row["policy"] for row in result.comparison]
    # the presets as given, then each one stored int8 / int4 (the "just quantize the preset" rows)
    assert names[:-1] == ["full cache", "toy-w3", "toy-w9", "toy-w3 + int8", "toy-w3 + int4", "toy-w9 + int8",
                          "toy-w9 + int4"] and names[-1].startswith("winner (")
    winner = result.comparison[-1]
    assert winner["memory_fraction"] <= 0.4
    final = [e for e in log if e["n"] == cfg.final_samples]
    assert {e["family"] for e in final} == {"toy", "full"}
    assert all(e["seed"] != cfg.seed for e in final)  # held-out seeds
    for name in ("pareto.csv", "pareto.png", "comparison.csv", "comparison.md", "config.json"):
        assert (cfg.out_dir / name).stat().st_size > 0
    # MLflow: one parent run with a child per trial, filterable by the study tag
    client = mlflow.tracking.MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name("varkv-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`tuner.study` = '{cfg.study_name}'")
    parents = [r for r in runs if r.data.tags.get("tuner.role") == "study"]
    assert len(parents) == 1 and len(runs) == 1 + len(trials)  # a child run per trial, duplicates too
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == result.mlflow_run_id
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "search_space", "pareto", "policy", "summary"} <= arts
    assert "winner.fid_vs_full" in parent.data.metrics


def test_resume_continues_and_never_reevaluates(tmp_path, toy_presets):
    first = run_search(config(tmp_path, trials=6), progress=False)
    cfg = config(tmp_path, trials=11)
    second = run_search(cfg, progress=False)
    assert sum(r.counts for r in first.records) == 6 and sum(r.counts for r in second.records) == 11
    assert [r.number for r in second.records[:len(first.records)]] == [r.number for r in first.records]
    evaluated = Counter(json.dumps(e["params"], sort_keys=True) for e in screening(cfg, eval_log(cfg)))
    assert max(evaluated.values()) == 1
    assert load(cfg).user_attrs["presets_enqueued"] is True
    assert sum(1 for t in load(cfg).trials if t.user_attrs.get("preset")) == 1  # enqueued once


def test_cache_shared_by_two_studies_in_one_database(tmp_path):
    space = toy_space(tmp_path,
                      "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 2}\n")
    a = config(tmp_path, space=space, trials=6, mem_target="60%", presets=False)
    ra = run_search(a, progress=False)
    assert ra.evaluations == 2  # only two distinct policies exist
    # the sampler keeps proposing them: duplicates, not counted, until the space counts as exhausted
    assert sum(r.counts for r in ra.records) == 2 and "space looks exhausted" in ra.stop_reason
    assert all(r.cache_hit for r in ra.records if not r.counts)
    b = config(tmp_path, space=space, trials=4, mem_target="70%", presets=False, storage=a.storage)
    assert b.study_name != a.study_name
    rb = run_search(b, progress=False)
    # another study's evaluations are free but new to this study: its first two trials count
    assert rb.evaluations == 0 and all(r.cache_hit for r in rb.records)
    assert sum(r.counts for r in rb.records) == 2
    import optuna

    names = {s.study_name for s in optuna.get_all_study_summaries(a.storage)}
    assert names == {a.study_name, b.study_name}


def test_settings_of_an_existing_study_cannot_change(tmp_path):
    cfg = config(tmp_path, trials=3, presets=False)
    run_search(cfg, progress=False)
    other = config(tmp_path, trials=5, presets=False, mem_target="30%", study_name=cfg.study_name)
    with pytest.raises(UserError, match="was created with mem_target=0.4 \\(now 0.3\\)"):
        run_search(other, progress=False)
    assert len(load(cfg).trials) == 3


def test_invalid_policies_fail_and_the_search_goes_on(tmp_path):
    space = toy_space(tmp_path, "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 4}\n"
                                "      tag: {type: categorical, choices: [a, invalid]}\n")
    cfg = config(tmp_path, space=space, trials=10, mem_target="90%", presets=False)
    result = run_search(cfg, progress=False)
    failed = [r for r in result.records if r.state == "FAIL"]
    assert failed and all("tag 'invalid' is rejected" in r.error for r in failed)
    assert any(r.feasible for r in result.records) and result.policy_path is not None


def test_no_feasible_policy_means_no_evaluation_and_no_export(tmp_path):
    cfg = config(tmp_path, trials=5, mem_target="1%", presets=False)
    result = run_search(cfg, progress=False)
    assert all(r.plan_infeasible for r in result.records)
    assert eval_log(cfg) == [] and result.policy_path is None


def test_quality_limit_and_multi_objective(tmp_path):
    # a Fréchet distance needs its minimum sample count (the fake evaluator's images cost nothing)
    cfg = config(tmp_path, trials=8, mem_target=None, fid_limit=12.0, presets=False, samples=256,
                 final_samples=256)
    result = run_search(cfg, progress=False)
    study = load(cfg)
    assert [d.name for d in study.directions] == ["MINIMIZE"]
    for r in result.records:
        if r.evaluated:
            assert r.values == [r.metrics["memory_fraction"]]
            assert (r.constraints["quality"] <= 0) == (r.metrics["fid_vs_full"] <= 12.0)
    both = config(tmp_path, out=tmp_path / "both", trials=8, mem_target="60%", fid_limit=12.0, metric="psnr",
                  presets=False)
    result = run_search(both, progress=False)
    assert len(load(both).directions) == 2
    for r in result.records:
        if r.evaluated:
            assert r.values == [r.metrics["memory_fraction"], -r.metrics["psnr"]]


def test_bad_inputs_write_nothing(tmp_path):
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("families:\n  toy:\n    params:\n      window: {type: int, low: 1}\n")
    with pytest.raises(UserError, match=r"bad.yaml:4: families.toy.params.window: missing 'high'"):
        run_search(config(tmp_path, space=str(bad_space)), progress=False)
    with pytest.raises(UserError, match="--mlflow-uri http://127.0.0.1:1 is unreachable"):
        run_search(config(tmp_path, mlflow_uri="http://127.0.0.1:1"), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--storage .* cannot be created or written"):
        run_search(config(tmp_path, storage=f"sqlite:///{blocker / 'x.db'}"), progress=False)
    with pytest.raises(UserError, match="evaluator factory module 'no_such_module'"):
        run_search(config(tmp_path, evaluator="no_such_module:build"), progress=False)
    assert not (tmp_path / "run" / "study.db").exists()


def test_studies_and_show_commands(tmp_path, toy_presets):
    import typer
    from typer.testing import CliRunner

    from tuner.cli.search_cmd import register

    cfg = config(tmp_path, trials=8)
    result = run_search(cfg, progress=False)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["studies", "--storage", cfg.storage], terminal_width=250)
    assert res.exit_code == 0, res.output
    assert cfg.study_name in res.output and "8" in res.output and str(result.policy_path) in res.output
    res = runner.invoke(app, ["show", cfg.study_name, "--storage", cfg.storage], terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "Pareto front" in res.output and "exported policy (" in res.output
    res = runner.invoke(app, ["show", "nope", "--storage", cfg.storage])
    assert res.exit_code == 2 and "no study 'nope'" in res.output
    res = runner.invoke(app, ["studies", "--storage", f"sqlite:///{tmp_path / 'none.db'}"])
    assert res.exit_code == 2 and "no such database file" in res.output


def test_a_preset_that_fits_beats_a_worse_search_result(tmp_path, monkeypatch):
    """The winner is chosen among the best trials and the presets that fit the memory target."""
    space = toy_space(tmp_path,
                      "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 2}\n")
    good = Preset("toy-w4", "toy", {"window": 4, "odd_layers_half": True, "tag": "a"})  # outside the space
    monkeypatch.setattr(study_mod, "load_presets", lambda model_cfg, calibration=None: [good])
    cfg = config(tmp_path, space=space, trials=3, mem_target="45%")
    result = run_search(cfg, progress=False)
    assert all(r.metrics["memory_fraction"] < 0.31 for r in result.records if r.evaluated)
    # the preset keeps more (44% of the cache, within the target), so its fake quality is better
    assert result.comparison[-1]["policy"] == "winner (preset toy-w4)"
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(result.policy_path, checkpoint_sha256="fake-tiny")
    assert policy.params()["window"] == 4 and info.provenance["preset"] == "toy-w4"
    assert info.provenance["trial"] is None


@pytest.mark.parametrize("fit", [True, False])
def test_memory_target_fits_every_policy_and_baselines_warm_start_the_joint_space(tmp_path, fit):
    """Under --mem-target each policy's budget knob fills the target (unless --no-fit); the token-cap
    baselines are enqueued in their budgets form next to the paper presets."""
    from tuner.search.space_files import space_path_for

    cfg = config(tmp_path, space=str(space_path_for("all")), trials=8, mem_target="15%", fit_memory=fit)
    result = run_search(cfg, progress=False)
    by_preset = {r.preset: r for r in result.records if r.preset}
    assert {"ams", "scalekv_10", "budgets:window@ams", "budgets:sink_window@ams"} <= set(by_preset)
    assert by_preset["budgets:sink_window@ams"].params["rule"] == "sink_recent"
    ams = by_preset["ams"]
    if fit:
        evaluated = [r for r in result.records if r.evaluated]
        assert len(evaluated) == len(result.records)  # nothing is over the target any more
        assert all(r.metrics["memory_fraction"] <= 0.15 for r in evaluated)
        assert 0.12 < ams.metrics["memory_fraction"] <= 0.15 and ams.params["c_min"] is not None
        from tuner.policy_file import load_policy_file

        # the exported file is the fitted policy that was evaluated, also when a preset wins
        _, info = load_policy_file(result.policy_path, checkpoint_sha256="fake-tiny")
        assert info.memory["fraction"] <= 0.15
        assert info.memory["fraction"] == pytest.approx(result.comparison[-1]["memory_fraction"])
    else:  # the paper's AMS-KV default keeps ~39% of the tiny model's cache
        assert ams.plan_infeasible and ams.metrics["memory_fraction"] > 0.3


def test_a_winning_preset_is_exported_fitted_to_the_target(tmp_path, monkeypatch):
    """A preset outside the space that wins the final round is written as the fitted policy that was
    evaluated, not with the paper's own (larger) budget."""
    space = toy_space(tmp_path,
                      "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 1}\n")
    wide = Preset("sink_window@wide", "sink_window", {"sink_scales": 2, "window": 7, "max_tokens": 150})
    monkeypatch.setattr(study_mod, "load_presets", lambda model_cfg, calibration=None: [wide])
    cfg = config(tmp_path, space=space, trials=2, mem_target="35%")
    result = run_search(cfg, progress=False)
    # the preset itself or its int8 / int4 variant, whichever is best
    assert result.comparison[-1]["policy"].startswith("winner (preset sink_window@wide")
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(result.policy_path, checkpoint_sha256="fake-tiny")
    assert policy.max_tokens < 150 and 0.3 < info.memory["fraction"] <= 0.35
