"""The shipped search spaces against the real policy families, on every named model, and a search
on ``--family all`` with the real paper presets (fake evaluator: fast and model-free)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.search.fake_eval import FakeEvaluator
from tests.search.helpers import config, eval_log
from tuner.memory import memory_report
from tuner.model.config import NAMED_MODELS, model_config
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.registry import make_policy, registration
from tuner.search.driver import run_search
from tuner.search.space_files import (family_choices, load_space, searchable_families, space_dir,
                                      space_path_for)
from tuner.search.study import load_presets


@pytest.mark.parametrize("model", list(NAMED_MODELS))
def test_every_sampled_policy_plans_and_presets_round_trip(model):
    import optuna

    mc = model_config(model)
    g = CacheGeometry.from_var_config(mc.var)
    cal = FakeEvaluator(model).calibration()
    spec = PolicySpec(g, model, cal)
    # ``all`` is derived: every registered family with a space file, in registration order (a new
    # shipped family joins it without an edit here); each family's file defines that family alone
    searchable = searchable_families()
    assert searchable[:3] == ["ams", "scalekv", "budgets"]
    assert all(registration(f).product for f in searchable)  # ``toy`` (tests/search) has no space file
    assert family_choices() == (*searchable, "all")
    assert space_path_for("all") == space_dir() / "all.yaml"
    space = load_space(space_dir() / "all.yaml", g)
    assert space.family_names == searchable
    assert [Path(s).name for s in space.sources] == ["all.yaml"] + [f"{f}.yaml" for f in searchable]
    for name in searchable:
        assert space_path_for(name) == space_dir() / f"{name}.yaml"
        assert load_space(space_path_for(name), g).family_names == [name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    fractions = {f: [] for f in searchable}
    for _ in range(60):
        trial = study.ask()
        family, params = space.suggest(trial)
        report = memory_report(make_policy(family, params), mc, spec=spec)  # never raises
        fractions[family].append(report.fraction)
        study.tell(trial, 0.0)
    assert all(fractions.values())
    assert min(min(v) for v in fractions.values()) < 0.2  # low-memory regions are reachable
    presets = {p.name: p for p in load_presets(mc, cal)}
    inside = {n for n, p in presets.items() if space.trial_params(p.family, p.params) is not None}
    assert inside == {"ams", "scalekv_10", "scalekv_20"}  # the baselines are other families


def test_search_on_all_families_starts_from_the_paper_presets(tmp_path):
    cfg = config(tmp_path, space=None, family="all", trials=8, mem_target="35%", final_top_k=1)
    result = run_search(cfg, progress=False)
    first = result.records[:3]
    assert [r.preset for r in first] == ["ams", "scalekv_10", "scalekv_20"]
    assert [r.family for r in first] == ["ams", "scalekv", "scalekv"]
    names = [row["policy"] for row in result.comparison]
    assert names[0] == "full cache" and len(names) == 1 + 9 + 1
    assert {"window@ams", "sink_window@scalekv_10"} <= set(names)
    assert result.policy_path is not None
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(result.policy_path, model_config("tiny"), checkpoint_sha256="fake-tiny")
    assert info.provenance["study"] == cfg.study_name
    assert info.memory["fraction"] <= 0.35
    assert {e["family"] for e in eval_log(cfg)} >= {"ams", "scalekv", "full", "sink_window"}
    # window@ams compiles to the same plan as the enqueued budgets:window@ams trial (recent rule, same
    # budgets): one evaluation serves both, and every (plan, eval spec) was evaluated once
    rows = {row["policy"]: row for row in result.comparison}
    from tuner.search.storage import TunerTables

    log = TunerTables(cfg.storage).evaluation_log(cfg.study_name)
    keys = [(e["policy_hash"], e["eval_key"]) for e in log]
    assert len(keys) == len(set(keys)) == len(eval_log(cfg))
    assert rows["window@ams"]["psnr"] == rows["window@scalekv_10"]["psnr"]
