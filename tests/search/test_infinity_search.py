"""The product path on Infinity (issue 19): a depth-2 random-weight Infinity searched in-process with
the real evaluator (paired PSNR/SSIM against the full cache on the built-in prompts, calibrated
families included), comparison grids, its exported policy loaded, generated with and benchmarked
(allocated == planned), and the resume hint carrying the Infinity flags."""
from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from tuner.cli.app import build_app
from tuner.search.command_line import resume_command
from tuner.search.config import resolve_config
from tuner.search.driver import run_search

SIDES = (1, 2, 4)  # 64², 21 tokens
runner = CliRunner()


@pytest.fixture()
def search_result(tmp_path_factory, monkeypatch):
    tmp = tmp_path_factory.mktemp("infinity_search")
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp / "cache"))
    cfg = resolve_config(model="infinity-test", random_weights=True, sides=SIDES, mem_target="50%",
                         family="all", trials=3, samples=2, min_samples=2, final_samples=2, final_top_k=1,
                         workers=0, device="cpu", mlflow_uri="none", out=str(tmp / "run"), eval_batch_size=4,
                         proxy_candidates=4, proxy_top=1, presets=False, grids=True)
    return cfg, run_search(cfg, progress=False), tmp


def test_search_generate_bench_on_a_random_infinity(search_result):
    cfg, result, tmp = search_result
    assert cfg.study_name == "infinity-test_1-2-4-all-mem50pct"
    evaluated = [r for r in result.records if r.evaluated]
    assert evaluated, [r.error for r in result.records]
    for r in evaluated:
        m = r.metrics
        assert 0 < m["memory_fraction"] <= 0.5 and 0 < m["ssim"] <= 1 and m["samples"] == 2
        assert {"psnr", "psnr_se", "ssim_se", "kv_bytes_per_image"} <= set(m)
    names = [row["policy"] for row in result.comparison]
    assert names[0] == "full cache" and names[-1].startswith("winner")
    assert result.policy_path is not None and result.policy_path.is_file()
    assert list((tmp / "run" / "grids").glob("*.png"))  # same-seed grids over the prompts

    from tuner.model.config import model_config
    from tuner.policy_file import load_policy_file

    at_sides = dataclasses.replace(model_config("infinity-test"), sides=SIDES)
    policy, info = load_policy_file(result.policy_path, at_sides)
    assert policy.family == result.comparison[-1]["family"] and info.memory["fraction"] <= 0.5

    common = ["--model", "infinity-test", "--random-weights", "--sides", "1,2,4", "--device", "cpu",
              "--policy", result.policy_path]
    gen = runner.invoke(build_app(), ["generate", *map(str, common), "--prompt", "a cat", "--out",
                                      str(tmp / "images")])
    assert gen.exit_code == 0, gen.output
    assert (tmp / "images" / "0000_prompt0.png").is_file()
    bench = runner.invoke(build_app(), ["bench", *map(str, common), "--batch", "2", "--warmup", "0",
                                        "--repeats", "1", "--json"])
    assert bench.exit_code == 0, bench.output
    b = json.loads(bench.output)
    assert b["kv_bytes_allocated"] == b["kv_bytes_planned"] and b["memory_fraction"] <= 0.5


def test_resume_hint_carries_the_infinity_flags(tmp_path, monkeypatch):
    from tests.search.test_resume_command import parsed

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = resolve_config(model="infinity-test", random_weights=True, sides="1,2,4", prompts=str(prompts),
                         mem_target="50%")
    hint = resume_command(cfg)
    assert "--random-weights" in hint and "--sides 1,2,4" in hint and f"--prompts {prompts}" in hint
    assert parsed(hint, monkeypatch) == cfg
    assert cfg.identity()["sides"] == [1, 2, 4]
    assert "sides" not in resolve_config(model="tiny", mem_target="50%").identity()  # old studies unchanged
