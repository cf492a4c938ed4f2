"""The Python API (``import tuner``): cheap to import, and every function gives what its command gives."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tuner
from tuner.cli.app import build_app
from tuner.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY_POLICY = ROOT / "policies" / "tiny-15pct.json"
HEAVY = ("torch", "optuna", "ray", "mlflow", "triton", "numpy")


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def test_import_tuner_is_lazy_and_names_the_api():
    """Nothing heavy at import (also tests/test_layering.py); the first name used loads tuner.api, which
    itself imports torch only when a function runs."""
    code = ("import sys, tuner\nheavy = sorted(m for m in %r if m in sys.modules)\n"
            "print(heavy, 'tuner.api' in sys.modules, sorted(set(tuner.__all__) - set(dir(tuner))))\n"
            "tuner.load_model\nprint('tuner.api' in sys.modules, 'torch' in sys.modules)" % (HEAVY,))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["[] False []", "True False"]
    for name in tuner.__all__:
        assert getattr(tuner, name) is getattr(tuner.api, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tuner.nope  # noqa: B018


def test_tuner_search_is_the_callable_search_package():
    """``tuner.search(...)`` works on a fresh ``import tuner`` and imports nothing heavy until called."""
    code = ("import sys, tuner\ns = tuner.search\nprint(callable(s), s.__name__, "
            "sorted(m for m in %r if m in sys.modules))" % (HEAVY,))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True tuner.search []"


def test_load_model_by_name_paths_and_random_weights(small_ckpts):
    tiny = tuner.load_model("tiny")
    facts = (tiny.name, tiny.resolution, tiny.num_classes, tiny.device, tiny.dtype)
    assert facts == ("tiny", 32, 10, "cpu", "fp32")
    assert tiny.checkpoint_sha256 == json.loads(TINY_POLICY.read_text())["model"]["checkpoint_sha256"]
    by_paths = tuner.load_model(small_ckpts)
    by_kw = tuner.load_model(var_ckpt=small_ckpts[0], vae_ckpt=small_ckpts[1])
    assert by_paths.checkpoint_sha256 == by_kw.checkpoint_sha256 is not None
    rnd = tuner.load_model("d16", random_weights=True, dtype="bf16")
    assert rnd.checkpoint_sha256 is None and rnd.geometry.num_layers == 16 and rnd.dtype == "bf16"
    with pytest.raises(AttributeError):
        tiny.dtype = "fp16"  # frozen
    with pytest.raises(UserError, match="dtype 'fp8' is not one of fp32, fp16, bf16"):
        tuner.load_model("tiny", dtype="fp8")
    with pytest.raises(UserError, match="as two paths"):
        tuner.load_model(["a.pth"])
    with pytest.raises(UserError, match="unknown model 'd99'"):
        tuner.load_model("d99")


def test_load_policy_checks_the_model(api_model):
    tiny = tuner.load_model("tiny")
    pol = tuner.load_policy(TINY_POLICY, tiny)
    assert pol.family == "ams" and pol.checked_for == ("tiny", tiny.checkpoint_sha256)
    assert pol.memory_fraction == pytest.approx(json.loads(TINY_POLICY.read_text())["memory"]["fraction"])
    with pytest.raises(UserError, match="is a policy for model tiny") as err:
        tuner.load_policy(TINY_POLICY, api_model)
    assert "\n" not in str(err.value)
    unchecked = tuner.load_policy(TINY_POLICY)  # no model: checked when it is used
    assert unchecked.checked_for is None
    with pytest.raises(UserError, match="is a policy for model tiny"):
        tuner.generate(api_model, [0], policy=unchecked)
    with pytest.raises(UserError, match="no such file|cannot read|not found"):
        tuner.load_policy(ROOT / "policies" / "missing.json")


def test_generate_equals_tuner_generate_with_the_policy(tmp_path, api_model, small_ckpts, policy_files):
    """Same batches (batch i seeded seed + i), same engine: the CLI's samples.npz exactly."""
    out = tmp_path / "cli"
    res = cli("generate", "--var-ckpt", small_ckpts[0], "--vae-ckpt", small_ckpts[1], "--classes", "4,5,9",
              "--seed", "3", "--batch-size", "2", "--policy", policy_files["scalekv"], "--top-k", "20",
              "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    images = tuner.generate(api_model, [4, 5, 9], policy=policy_files["scalekv"], seed=3, batch_size=2,
                            top_k=20)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert np.array_equal(np.load(out / "samples.npz")["images"], images.numpy())
    handle = tuner.load_policy(policy_files["scalekv"], api_model)
    assert torch.equal(tuner.generate(api_model, torch.tensor([4, 5, 9]), policy=handle, seed=3, batch_size=2,
                                      top_k=20), images)
    full = tuner.generate(api_model, 4, seed=3, top_k=20)
    assert full.shape == (1, 3, 8, 8) and not torch.equal(full[0], images[0])


@pytest.mark.parametrize("kwargs,fragment", [
    ({"classes": [10]}, "classes [10] must be ids in [0, 10) for model d2"),
    ({"classes": []}, "classes [] must be ids"),
    ({"classes": [1], "top_p": 2.0}, "--top-p 2.0 is outside [0, 1]"),
    ({"classes": [1], "batch_size": 0}, "batch_size 0 must be positive"),
    ({"classes": [1], "policy": 3}, "policy must be a policy file path or tuner.load_policy(...), not int"),
])
def test_generate_refuses_bad_input(api_model, kwargs, fragment):
    classes = kwargs.pop("classes")
    with pytest.raises(UserError) as err:
        tuner.generate(api_model, classes, **kwargs)
    assert fragment in str(err.value)


def test_plan_gives_tuner_plans_figures():
    res = cli("plan", "--model", "tiny", "--policy", TINY_POLICY, "--gpu-mem", "24GiB", "--json")
    assert res.exit_code == 0, res.output
    want = json.loads(res.output)
    for model in ("tiny", tuner.load_model("tiny")):
        got = tuner.plan(model, TINY_POLICY, gpu_mem="24GiB")
        assert (got.kv_bytes_per_image, got.full_kv_bytes_per_image, got.fraction, got.max_batch) == (
            want["kv_bytes_per_image"], want["full_kv_bytes_per_image"], want["fraction"], want["max_batch"])
        assert list(got.resident_bytes_per_scale) == want["resident_bytes_per_scale"]
        assert list(got.capacities) == want["capacities"] and list(got.kv_formats) == want["kv_formats"]
    eight = tuner.plan("tiny", tuner.load_policy(TINY_POLICY), batch=8, gpu_mem=24 * 2**30)
    assert eight.kv_bytes_total == 8 * eight.kv_bytes_per_image and eight.max_batch == want["max_batch"]
    text = cli("plan", "--model", "tiny", "--policy", TINY_POLICY, "--gpu-mem", "24GiB").output
    assert tuner.plan("tiny", TINY_POLICY, gpu_mem="24GiB").table().strip() == text.strip()
    assert tuner.plan("tiny", TINY_POLICY).max_batch is None
    with pytest.raises(UserError, match="is a policy for model tiny"):
        tuner.plan("d16", TINY_POLICY)


def test_search_policy_builds_the_clis_config(tmp_path, monkeypatch):
    """The same flags give the same frozen SearchConfig through the CLI and through Python."""
    from tuner.search import driver

    seen = []

    def capture(cfg, **kw):
        seen.append(cfg)
        return driver.SearchResult(cfg.study_name, cfg.storage, cfg.out_dir, "reached 3 trials", [],
                                   policy_path=cfg.out_dir / "p.json", comparison=[{"policy": "full cache"}])

    monkeypatch.setattr(driver, "run_search", capture)
    out = tmp_path / "s"
    res = cli("search", "--mem-target", "12%", "--trials", "3", "--samples", "4", "--min-samples", "2",
              "--family", "ams", "--seed", "5", "--timeout", "60", "--no-presets", "--out", out,
              "--mlflow-uri", "none", "--attention-backend", "torch", "--no-progress")
    assert res.exit_code == 0, res.output
    flags = dict(mem_target="12%", trials=3, samples=4, min_samples=2, family="ams", seed=5, timeout_s=60,
                 presets=False, out=str(out), mlflow_uri="none", backend="torch")
    summary = tuner.search_policy(**flags)
    assert seen[0] == seen[1] == summary.config == tuner.search_config(**flags)
    again = tuner.search(**flags)  # the search package is callable: the same run
    assert again == summary and seen[2] == seen[0]
    assert summary.policy_path == out / "p.json" and summary.comparison == ({"policy": "full cache"},)
    assert (summary.study_name, summary.stop_reason, summary.interrupted) == (
        "tiny-ams-mem12pct", "reached 3 trials", False)
    with pytest.raises(UserError, match="--mem-target"):
        tuner.search_policy(trials=3)


def test_search_policy_runs_a_real_search_and_exports_a_loadable_policy(tmp_path):
    summary = tuner.search_policy(mem_target="15%", family="budgets", trials=2, samples=2, min_samples=2,
                                  final_samples=2, final_top_k=1, workers=0, proxy_candidates=0,
                                  presets=False, mlflow_uri="none", out=str(tmp_path / "run"), device="cpu")
    assert summary.policy_path is not None and summary.policy_path.is_file() and summary.trials == 2
    assert [row["policy"] for row in summary.comparison][0] == "full cache"
    model = tuner.load_model("tiny")
    policy = tuner.load_policy(summary.policy_path, model)
    assert policy.memory_fraction <= 0.15
    assert tuner.generate(model, [1, 2], policy=policy).shape == (2, 3, 32, 32)
