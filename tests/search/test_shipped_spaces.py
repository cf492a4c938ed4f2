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
    g = mc.geometry  # Infinity's too: every family plans on every named model's geometry
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
    # low-memory regions are reachable: below 20%, or near the workspace's own share on a model too
    # shallow for that (infinity-test: 2 layers, the 36-token workspace alone is 36 / (2 · 57) = 31.6%)
    floor = max(g.scale_lengths) / (g.seq_len * g.num_layers)
    assert min(min(v) for v in fractions.values()) < max(0.2, floor + 0.05)
    presets = {p.name: p for p in load_presets(mc, cal)}
    inside = {n for n, p in presets.items() if space.trial_params(p.family, p.params) is not None}
    assert inside == {"ams", "scalekv_10", "scalekv_20", "hack", "heatkv"}  # the baselines: other families


def test_search_on_all_families_starts_from_the_paper_presets(tmp_path):
    cfg = config(tmp_path, space=None, family="all", trials=8, mem_target="35%", final_top_k=1)
    result = run_search(cfg, progress=False)
    # the published presets first; scalekv_20 fits to the same policy as scalekv_10 at 35% (merged)
    # (the baselines of the later methods fit to the same policies as window@ams / sink_window@ams)
    first = result.records[:6]
    assert [r.preset for r in first] == ["ams", "scalekv_10", "hack", "heatkv", "budgets:window@ams",
                                         "budgets:sink_window@ams"]
    assert [r.family for r in first] == ["ams", "scalekv", "hack", "heatkv", "budgets", "budgets"]
    names = [row["policy"] for row in result.comparison]
    assert names[0] == "full cache" and names[-1].startswith("winner (")
    # every distinct fitted preset, then each one quantized ("just quantize the preset" rows)
    distinct = ["ams", "window@ams", "sink_window@ams", "scalekv_10", "hack", "heatkv"]
    assert names[1:-1] == distinct + [f"{n} + {f}" for n in distinct for f in ("int8", "int4")]
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
    assert rows["window@ams"]["memory_fraction"] <= 0.35  # window@scalekv_10 fitted to it: merged above


@pytest.mark.parametrize("model", ["tiny", "d30"])
def test_storage_formats_are_searched_and_quantized_presets_enqueue_exactly(model):
    """Every shipped space searches kv_format per layer group; a 16-bit preset enqueues with every group
    ``compute`` and "preset + int4" with every group int4, and the trial runs exactly that policy."""
    from tuner.search.study import budgets_forms, quantized_presets

    mc = model_config(model)
    g = mc.geometry  # Infinity's too: every family plans on every named model's geometry
    cal = FakeEvaluator(model).calibration()
    space = load_space(space_dir() / "all.yaml", g)
    groups = min(3, g.num_layers)
    for fam in space.families:
        kv = next(p for p in fam.params if p.name == "kv_format")
        assert kv.repeat == groups and set(kv.choices) == {"compute", "int8", "int4"}
    presets = load_presets(mc, cal)
    quantized = quantized_presets(presets)
    assert [p.name for p in quantized[:2]] == [f"{presets[0].name} + int8", f"{presets[0].name} + int4"]
    forms = budgets_forms(presets + quantized, g)
    for p in [*presets, *quantized, *forms]:
        params = space.trial_params(p.family, p.params)
        if p.family not in space.family_names:
            assert params is None
            continue
        assert params is not None, p.name
        fmt = p.params["kv_format"]
        assert [params[f"{p.family}.kv_format.{i}"] for i in range(groups)] == [fmt] * groups

        class Replay:  # what Optuna does with an enqueued trial: returns the enqueued values
            def suggest_int(self, name, *a, **k):
                return params[name]

            suggest_float = suggest_int

            def suggest_categorical(self, name, choices):
                return params[name]

        family, got = space.suggest(Replay())
        assert make_policy(family, got) == make_policy(p.family, p.params), p.name


def test_a_preset_format_the_space_does_not_search_is_not_enqueued(tmp_path):
    """The toy space has no kv_format: "w3 + int8" must not be enqueued as the 16-bit w3 (it is only
    compared in the final round), while w3 itself still is."""
    from tests.search.helpers import toy_space

    g = CacheGeometry.from_var_config(model_config("tiny").var)
    space = load_space(toy_space(tmp_path), g)
    w3 = {"window": 3, "odd_layers_half": True, "tag": "a"}
    assert space.trial_params("toy", {**w3, "kv_format": "compute"}) is not None
    assert space.trial_params("toy", {**w3, "kv_format": "int8"}) is None
