"""The resume hint printed on an interruption is a command that rebuilds the very same config."""
from __future__ import annotations

import dataclasses
import shlex

from typer.testing import CliRunner

from tests.search.cli_entry import app
from tests.search.helpers import toy_space
from tuner.search.command_line import resume_command
from tuner.search.config import SearchConfig, resolve_config


def parsed(command: str, monkeypatch) -> SearchConfig:
    """The config the real ``tuner search`` flags give for ``command`` (nothing is run)."""
    import tuner.search.driver as driver
    import tuner.search.ray_pool as ray_pool

    seen = []
    monkeypatch.setattr(driver, "run_search", lambda cfg, **kw: seen.append(cfg) or _Done())
    monkeypatch.setattr(ray_pool, "_tcp_reachable", lambda host, port: True)  # the hint names a cluster
    argv = shlex.split(command)
    assert argv[:2] == ["tuner", "search"]
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0 and seen, res.output
    return seen[0]


class _Done:
    interrupted = False
    exit_code = 0


def test_every_field_that_differs_from_its_default_comes_back(tmp_path, monkeypatch):
    weights = tmp_path / "w"
    weights.mkdir()
    prompts = tmp_path / "my prompts.txt"
    prompts.write_text("a cat\n")
    cfg = resolve_config(
        model="d16", weights_dir=str(weights), var_ckpt="v.pth", vae_ckpt="q.pth", mem_target="12.5%",
        fid_limit=3.25, metric="feat_dist", space=toy_space(tmp_path), trials=17, timeout_s=99.5, patience=4,
        samples=6, min_samples=3, reduction_factor=3, final_samples=10, final_top_k=5, workers=3, threads=2,
        ray_address="127.0.0.1:6379", gpus=2,
        storage=f"sqlite:///{tmp_path / 'db' / 's.db'}", study_name="my study", mlflow_uri="none",
        experiment="exp x", sampler="random", seed=7, out=str(tmp_path / "o u t"), device="cuda",
        dtype="bf16",
        backend="torch", cfg=2.25, top_k=100, top_p=0.9, eval_batch_size=4, trial_timeout_s=123.0,
        presets=False, proxy_candidates=5, proxy_top=2, fit_memory=False, grids=False,
        evaluator="tests.search.fake_eval:build",
        evaluator_kwargs={"sleep": "0.5", "log": str(tmp_path / "l og")}, random_weights=True,
        sides=(1, 2, 4), aspect="2:1", scales=3, prompts=str(prompts))
    defaults = SearchConfig.__dataclass_fields__
    unchanged = [f.name for f in dataclasses.fields(cfg)
                 if getattr(cfg, f.name) == defaults[f.name].default and f.name != "family"]
    assert unchanged == [], "set every field in this test so the hint is checked for all of them"
    assert parsed(resume_command(cfg), monkeypatch) == cfg


def test_a_default_search_comes_back_with_its_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(model="tiny", mem_target="15%")
    hint = resume_command(cfg)
    assert f"--storage {cfg.storage}" in hint and f"--out {cfg.out}" in hint
    monkeypatch.chdir("/")  # the hint works from any directory
    assert parsed(hint, monkeypatch) == cfg


def test_grids_flags_come_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value, flag in ((True, "--grids"), (False, "--no-grids")):
        cfg = resolve_config(model="tiny", mem_target="15%", grids=value)
        hint = resume_command(cfg)
        assert f" {flag} " in f"{hint} " and parsed(hint, monkeypatch) == cfg
    assert "-grids " not in resume_command(resolve_config(model="tiny", mem_target="15%")) + " "
