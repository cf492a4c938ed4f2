"""Non-square Infinity schedules through the CLI and the policy file (issue 19): `--aspect H:W` and
`--scales N` plan exact bytes and run the engine, bad flags are one `error:` line (exit 2), a policy
file records its `(h, w)` maps and a square file (with no such field) still loads as square."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app
from tuner.cli.policy_opts import placeholder_calibration
from tuner.errors import UserError
from tuner.model.config import at_schedule, model_config
from tuner.policies.base import PolicySpec
from tuner.policies.registry import make_policy
from tuner.policy_file import load_policy_file, write_policy_file

runner = CliRunner()
OLD_MODEL_KEYS = {"name", "depth", "patch_nums", "num_heads", "head_dim", "checkpoint_sha256"}
TEST_2_1 = [[1, 1], [2, 2], [4, 2], [6, 3]]  # infinity-test's 4 scales at 2:1 (31 tokens, 96 × 48 px)


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


def _plan(*args) -> dict:
    r = run("plan", "--family", "full", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_plan_gives_the_exact_bytes_of_a_non_square_schedule():
    # 11,269 tokens × 32 layers × (K, V) × 2 rows × 16 heads × 128 × 2 bytes
    assert _plan("--model", "infinity-2b", "--aspect", "2:1")["kv_bytes_per_image"] == 5_908_201_472
    assert _plan("--model", "infinity-2b", "--aspect", "1:2")["kv_bytes_per_image"] == 5_908_201_472
    # the official 0.25M prefix of 1:2 (10 scales, 2,681 tokens); 8B: 40 layers × 28 heads
    assert _plan("--model", "infinity-2b", "--aspect", "1:2", "--scales", "10")["kv_bytes_per_image"] \
        == 2_681 * 32 * 2 * 2 * 16 * 128 * 2
    tokens_4_3 = sum(h * w for h, w in model_config("infinity-8b").at_aspect(1.333).schedule)
    assert _plan("--model", "infinity-8b", "--aspect", "4:3")["kv_bytes_per_image"] \
        == tokens_4_3 * 40 * 2 * 2 * 28 * 128 * 2
    square = _plan("--model", "infinity-2b")
    assert square == _plan("--model", "infinity-2b", "--aspect", "1:1")  # 1:1 is the default
    table = run("plan", "--model", "infinity-2b", "--aspect", "2:1", "--family", "scalekv",
                "--gpu-mem", "80GiB")
    assert table.exit_code == 0, table.output
    assert "| s0 (1²) | s1 (2²) | s2 (4×2) | s3 (6×3) |" in table.output and "1440×720 px" in table.output


@pytest.mark.parametrize("args,fragments", [
    (("plan", "--model", "infinity-2b", "--aspect", "5:3", "--family", "full"),
     ("--aspect 5:3 has no official Infinity schedule", "1:3, 2:5, 1:2, 4:7, 2:3, 3:4, 4:5, 1:1, 5:4, 4:3")),
    (("plan", "--model", "infinity-2b", "--aspect", "wide", "--family", "full"), ("not H:W",)),
    (("plan", "--model", "d16", "--aspect", "2:1", "--family", "full"),
     ("--aspect applies to Infinity models only, not --model d16",)),
    (("plan", "--model", "infinity-2b", "--aspect", "2:1", "--sides", "1,2", "--family", "full"),
     ("at --aspect 2:1 pass --scales N",)),
    (("plan", "--model", "infinity-2b", "--sides", "1,2", "--scales", "2", "--family", "full"),
     ("not both",)),
    (("plan", "--model", "infinity-2b", "--scales", "14", "--family", "full"), ("has 13 scales",)),
    (("plan", "--model", "infinity-2b", "--scales", "0", "--family", "full"), ("at least 1",)),
    (("generate", "--model", "tiny", "--aspect", "2:1"), ("--aspect applies to Infinity models only",)),
    (("generate", "--model", "infinity-test", "--random-weights", "--aspect", "3:5"), ("3:5",)),
])
def test_bad_schedule_flags_are_one_line(args, fragments):
    assert_user_error(run(*args), *fragments)


def test_generate_and_bench_run_a_non_square_schedule(tmp_path):
    out = tmp_path / "out"
    common = ("--model", "infinity-test", "--random-weights", "--device", "cpu", "--aspect", "2:1")
    r = run("generate", *common, "--prompt", "a tall tower", "--out", out)
    assert r.exit_code == 0, r.output
    assert np.load(out / "samples.npz")["images"].shape == (1, 3, 96, 48)
    r = run("bench", *common, "--scales", "3", "--batch", "2", "--warmup", "0", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    assert b["kv_bytes_allocated"] == b["kv_bytes_planned"] > 0 and len(b["per_scale_ms"]) == 3
    # presets calibrate the 2:1 model and write policy files for its maps; bench allocates their plan
    r = run("presets", *common, "--mem-target", "60%", "--calibration-samples", "2", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "ams.json").read_text())["model"]["scale_shapes"] == TEST_2_1
    r = run("bench", *common, "--policy", tmp_path / "p" / "scalekv_10.json", "--batch", "2", "--warmup", "0",
            "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    assert b["kv_bytes_allocated"] == b["kv_bytes_planned"] and b["memory_fraction"] <= 0.6


@pytest.mark.parametrize("command", ["generate", "bench", "evaluate", "calibrate", "presets", "search",
                                     "plan"])
def test_every_command_documents_the_schedule_flags(command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "--aspect" in r.output and "--scales" in r.output


def test_policy_file_records_the_shapes_and_square_files_load_as_before(tmp_path):
    wide = at_schedule(model_config("infinity-test"), aspect="2:1")
    spec = PolicySpec(wide.geometry, wide.name, placeholder_calibration(wide))
    path = write_policy_file(tmp_path / "wide.json", make_policy("scalekv", {"budget_fraction": 0.3}), wide,
                             spec=spec)
    doc = json.loads(path.read_text())
    assert doc["model"]["scale_shapes"] == TEST_2_1 and doc["model"]["patch_nums"] == [1, 2, 4, 6]
    assert doc["calibration"]["scale_shapes"] == TEST_2_1  # the embedded statistics know their maps
    policy, info = load_policy_file(path, wide)
    assert policy.family == "scalekv" and [list(row) for row in info.plan.budgets] == doc["budgets"]
    import tuner

    assert tuner.load_policy(str(path)).geometry == wide.geometry
    with pytest.raises(UserError, match=r"scales 1x1 2x2 4x2 6x3\), not infinity-test \(depth 2, patch_nums "
                                        r"\[1, 2, 4, 6\]\); pass --model infinity-test with the --aspect"):
        load_policy_file(path, model_config("infinity-test"))
    assert run("policy", "validate", path, "--model", "infinity-test", "--aspect", "2:1").exit_code == 0
    assert "scales 1x1 2x2 4x2 6x3" in run("policy", "show", path).output
    # a square file has exactly the fields it always had, and loads as square
    square = model_config("infinity-test")
    old = write_policy_file(tmp_path / "square.json", make_policy("window", {"window": 1}), square)
    doc = json.loads(old.read_text())
    assert set(doc["model"]) == OLD_MODEL_KEYS
    assert load_policy_file(old, square)[1].model == doc["model"]
    with pytest.raises(UserError, match=r"patch_nums \[1, 2, 4, 6\]\), not infinity-test \(depth 2, scales"):
        load_policy_file(old, wide)
    # malformed shapes are one line naming the field
    doc = json.loads(path.read_text())
    doc["model"]["scale_shapes"][2] = [4]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="field 'model.scale_shapes\\[2\\]' must be \\[height, width\\]"):
        load_policy_file(bad)


def test_search_config_carries_the_schedule_flags(tmp_path, monkeypatch):
    from tests.search.test_resume_command import parsed
    from tuner.search.command_line import resume_command
    from tuner.search.config import resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(model="infinity-test", random_weights=True, aspect="4:2", scales=3,
                         mem_target="50%")
    assert cfg.aspect == "2:1" and cfg.scales == 3 and cfg.study_name.startswith("infinity-test_2x1-s3-")
    assert cfg.identity()["aspect"] == "2:1" and cfg.identity()["scales"] == 3
    hint = resume_command(cfg)
    assert "--aspect 2:1 --scales 3" in hint and parsed(hint, monkeypatch) == cfg
    assert "aspect" not in resolve_config(model="tiny", mem_target="50%").identity()  # old studies unchanged
    with pytest.raises(UserError, match="--aspect 5:3 has no official"):
        resolve_config(model="infinity-test", aspect="5:3", mem_target="50%")


def test_a_search_on_a_non_square_schedule_exports_a_policy_for_it(tmp_path, monkeypatch):
    """Workers load the model at the driver's --aspect/--scales; the proxy, the screening, the image
    grids and the exported policy file all follow the (h, w) maps."""
    from tuner.search.config import resolve_config
    from tuner.search.driver import run_search

    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = resolve_config(model="infinity-test", random_weights=True, aspect="2:1", scales=4, mem_target="50%",
                         family="all", trials=2, samples=2, min_samples=2, final_samples=2, final_top_k=1,
                         workers=0, device="cpu", mlflow_uri="none", out=str(tmp_path / "run"),
                         eval_batch_size=4, proxy_candidates=2, proxy_top=1, presets=False, grids=True)
    result = run_search(cfg, progress=False)
    assert [r for r in result.records if r.evaluated], [r.error for r in result.records]
    assert result.policy_path is not None and list((tmp_path / "run" / "grids").glob("*.png"))
    wide = at_schedule(model_config("infinity-test"), aspect="2:1", scales=4)
    policy, info = load_policy_file(result.policy_path, wide)
    assert info.model["scale_shapes"] == TEST_2_1 and info.memory["fraction"] <= 0.5
