"""SearchConfig resolution (flags → frozen config, one-line UserErrors) and objectives/constraints."""
from __future__ import annotations

import math

import pytest

from tuner.errors import UserError
from tuner.mem_target import MemTarget
from tuner.search.config import SearchConfig, resolve_config
from tuner.search.objective import Objective, pareto_front


def test_defaults_live_in_the_output_directory(tmp_path):
    cfg = resolve_config(mem_target="15%", out=str(tmp_path / "run"))
    assert cfg.mem_target.fraction == pytest.approx(0.15)
    assert cfg.study_name == "tiny-all-mem15pct"
    assert cfg.storage == f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    # paired PSNR under a memory target alone (low noise at few samples), FID under a quality limit
    assert cfg.experiment == "varkv-tiny" and cfg.sampler == "tpe" and cfg.metric == "psnr"
    assert resolve_config(fid_limit=1.0, out=str(tmp_path / "r2")).metric == "fid_vs_full"
    assert not (tmp_path / "run").exists()  # resolving writes nothing
    again = resolve_config(mem_target="0.15", out=str(tmp_path / "run"))
    assert again.study_name == cfg.study_name  # same command → same study (resume)
    assert resolve_config(mem_target="15%", fid_limit=3.0, out=str(tmp_path)).study_name == \
        "tiny-all-mem15pct-fid_vs_full3"


def test_absolute_memory_target(tmp_path):
    cfg = resolve_config(mem_target="40MiB", out=str(tmp_path))
    assert cfg.mem_target.bytes_per_image == 40 * 2**20 and cfg.mem_target.fraction is None
    assert cfg.mem_target.violation(0.9, 20 * 2**20) == pytest.approx(-0.5)


@pytest.mark.parametrize("flags, message", [
    ({"mem_target": "0"}, "--mem-target '0'"),
    ({"mem_target": "150%"}, "--mem-target '150%'"),
    ({"mem_target": "abc"}, "--mem-target 'abc'"),
    ({"mem_target": ""}, "--mem-target is empty"),
    ({"mem_target": "15%", "model": "d99"}, "--model 'd99' is unknown"),
    ({"mem_target": "15%", "family": "nope"}, "--family 'nope' is not one of"),
    ({"mem_target": "15%", "sampler": "cmaes"}, "--sampler 'cmaes' is not one of tpe, nsga2, gp, random"),
    ({"mem_target": "15%", "metric": "lpips"}, "--metric 'lpips' is not one of"),
    ({}, "needs a target"),
    ({"mem_target": "15%", "trials": 0}, "--trials 0 must be at least 1"),
    ({"mem_target": "15%", "samples": 1}, "--samples 1 must be at least 2"),
    ({"mem_target": "15%", "space": "/nonexistent/space.yaml"},
     "--space /nonexistent/space.yaml: no such file"),
])
def test_bad_flags_are_one_line_user_errors(tmp_path, flags, message):
    with pytest.raises(UserError) as info:
        resolve_config(out=str(tmp_path / "o"), **flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_config_requires_resolution():
    with pytest.raises(ValueError, match="must be resolved"):
        SearchConfig(mem_target=MemTarget(fraction=0.2))


def test_objective_modes_and_constraints():
    m = {"memory_fraction": 0.2, "kv_bytes_per_image": 100.0, "fid_vs_full": 4.0, "psnr": 25.0}
    target = MemTarget(fraction=0.25)
    over = target.violation(m["memory_fraction"], m["kv_bytes_per_image"])  # the planner's figure
    mem_only = Objective("fid_vs_full", target, None)
    assert mem_only.directions == ["minimize"] and mem_only.values(m) == [4.0]
    assert mem_only.constraints(m, over) == {"memory": pytest.approx(0.2 / 0.25 - 1)}
    limit_only = Objective("fid_vs_full", None, 3.0)
    assert limit_only.values(m) == [0.2]
    assert limit_only.constraints(m, None) == {"quality": pytest.approx((4.0 - 3.0) / 3.0)}
    both = Objective("psnr", target, 24.0)
    assert both.multi and both.values(m) == [0.2, -25.0]
    assert both.constraints(m, over) == {"memory": pytest.approx(-0.2), "quality": pytest.approx(-1 / 24)}
    assert both.placeholder_values(0.9, None) == [0.9, -0.0]
    assert Objective("psnr", MemTarget(fraction=0.3), None).quality({"psnr": math.inf}) == -1e3


def test_pareto_front():
    pts = [("a", [0.1, 5.0]), ("b", [0.2, 3.0]), ("c", [0.3, 3.5]), ("d", [0.1, 6.0]), ("e", [0.5, 1.0])]
    assert pareto_front(pts) == ["a", "b", "e"]


def test_final_top_k_default_depends_on_the_objective():
    from tuner.search.config import QUALITY_LIMIT_FINAL_TOP_K, resolve_config

    assert resolve_config(mem_target="15%", final_top_k=None).final_top_k == 3
    assert resolve_config(fid_limit=20.0, final_top_k=None).final_top_k == QUALITY_LIMIT_FINAL_TOP_K
    assert resolve_config(fid_limit=20.0, final_top_k=2).final_top_k == 2
