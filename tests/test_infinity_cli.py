"""Infinity through the product CLI with random weights (issue 19): `tuner bench` allocates what it
plans, `tuner generate` writes images from prompts, `tuner evaluate` measures paired quality, and bad
input is one `error:` line with exit 2 (CPU, the depth-2 `infinity-test` at 64², seeded)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app

runner = CliRunner()
SMALL = ("--model", "infinity-test", "--random-weights", "--sides", "1,2,4", "--device", "cpu")  # 21 tokens


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bench(*extra) -> dict:
    r = run("bench", *SMALL, "--batch", "2", "--warmup", "0", "--repeats", "1", "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_bench_allocates_what_it_plans_full_and_compressed(tmp_path, cache_dir):
    full = _bench()
    assert full["model"] == "infinity-test" and "random text features" in full["weights"]
    assert full["kv_bytes_allocated"] == full["kv_bytes_planned"] > 0 and full["memory_fraction"] == 1.0
    assert len(full["per_scale_ms"]) == 3 and "random text features" in full["note"]
    r = run("presets", *SMALL, "--mem-target", "60%", "--out", tmp_path / "presets")
    assert r.exit_code == 0, r.output
    for name in ("scalekv_10", "ams"):
        res = _bench("--policy", tmp_path / "presets" / f"{name}.json")
        assert res["kv_bytes_allocated"] == res["kv_bytes_planned"] < full["kv_bytes_planned"]
        assert res["memory_fraction"] <= 0.6


def test_generate_writes_images_of_prompts(tmp_path):
    out = tmp_path / "out"
    r = run("generate", *SMALL, "--prompt", "a red fox", "--prompt", "a lighthouse at night", "--out", out)
    assert r.exit_code == 0, r.output
    assert "wrote 2 images of infinity-test" in r.output and "random text features" in r.output
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (2, 3, 64, 64) and data["labels"].tolist() == [0, 1]
    assert 0 <= data["images"].min() and data["images"].max() <= 1
    assert sorted(p.name for p in out.glob("0*.png")) == ["0000_prompt0.png", "0001_prompt1.png"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red fox", "a lighthouse at night"]
    # a prompt file: one prompt per non-empty line, surrounding spaces dropped
    again, prompts = tmp_path / "again", tmp_path / "p.txt"
    prompts.write_text("a lighthouse at night\n\n  a red fox  \n")
    assert run("generate", *SMALL, "--prompts", prompts, "--out", again).exit_code == 0
    assert (again / "prompts.txt").read_text().splitlines() == ["a lighthouse at night", "a red fox"]
    assert np.load(again / "samples.npz")["images"].shape == (2, 3, 64, 64)


def test_same_prompt_same_seed_same_image(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("generate", *SMALL, "--prompt", "a cat", "--out", a).exit_code == 0
    assert run("generate", *SMALL, "--prompt", "a cat", "--out", b).exit_code == 0
    assert np.array_equal(np.load(a / "samples.npz")["images"], np.load(b / "samples.npz")["images"])
    c = tmp_path / "c"
    assert run("generate", *SMALL, "--prompt", "a dog", "--out", c).exit_code == 0
    assert not np.array_equal(np.load(a / "samples.npz")["images"], np.load(c / "samples.npz")["images"])


def test_evaluate_measures_paired_quality_against_the_full_cache(cache_dir):
    r = run("evaluate", *SMALL, "--policy", "scalekv_10", "--samples", "2", "--batch-size", "2", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["model"] == "infinity-test" and m["samples"] == 2
    assert 0 < m["memory_fraction"] < 1 and np.isfinite(m["psnr"]) and 0 < m["ssim"] < 1
    full = json.loads(run("evaluate", *SMALL, "--policy", "full", "--samples", "2", "--json").output)
    assert full["memory_fraction"] == 1.0 and full["psnr"] == float("inf") and full["ssim"] == 1.0


@pytest.mark.parametrize("args,fragments", [
    (["generate", "--model", "tiny", "--prompt", "a cat"], ["--prompt", "class-conditional"]),
    (["generate", "--model", "tiny", "--prompts", "p.txt"], ["--prompts", "class-conditional"]),
    (["generate", *SMALL, "--prompts", "missing.txt"], ["--prompts", "not found"]),
    (["generate", *SMALL, "--prompts", "empty.txt"], ["holds no prompt"]),
    (["generate", *SMALL, "--prompt", "a", "--prompts", "p.txt"], ["not both"]),
    (["generate", *SMALL, "--classes", "1,2"], ["--classes", "text-to-image"]),
    (["generate", *SMALL, "--prompt", "  "], ["--prompt", "non-empty"]),
    (["generate", "--model", "infinity-test", "--random-weights", "--sides", "1,2,3"], ["--sides", "prefix"]),
    (["generate", "--model", "infinity-test", "--random-weights", "--sides", "x"], ["--sides", "integers"]),
    (["generate", "--model", "tiny", "--sides", "1,2"], ["--sides", "Infinity models only"]),
    (["bench", "--model", "tiny", "--sides", "1,2"], ["--sides", "Infinity models only"]),
    (["generate", "--model", "infinity-test"], ["--model infinity-test needs its weights", "--weights-dir",
                                                 "--random-weights"]),
    (["evaluate", "--model", "tiny", "--policy", "full", "--prompts", "p.txt"], ["--prompts",
                                                                                 "class-conditional"]),
    (["search", "--model", "tiny", "--mem-target", "50%", "--sides", "1,2", "--out", "s"],
     ["--sides", "Infinity models only"]),
    (["search", *SMALL[:3], "--mem-target", "50%", "--prompts", "missing.txt", "--out", "s"],
     ["--prompts", "not found"]),
])
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = [] if args[0] in ("search", "evaluate") or "--out" in args else ["--out", "o"]
    assert_user_error(run(*args, *out), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_infinity_samples_with_the_official_cli_settings_unless_told_otherwise(tmp_path):
    """Infinity's own defaults (cfg 3, top-k 900, top-p 0.97: tools/run_infinity.py), not VAR's 1.5 / 0.96."""
    images = {}
    for name, flags in (("default", ()), ("official", ("--cfg", 3, "--top-k", 900, "--top-p", 0.97)),
                        ("var", ("--cfg", 1.5, "--top-p", 0.96))):
        r = run("generate", *SMALL, "--prompt", "a red fox", "--out", tmp_path / name, *flags)
        assert r.exit_code == 0, r.output
        images[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(images["default"], images["official"])
    assert not np.array_equal(images["default"], images["var"])


def test_search_calibration_and_proxy_default_to_the_models_own_sampling():
    from tuner.calibration import calibrate
    from tuner.model.loading import load_model
    from tuner.options import INFINITY_SAMPLING, SAMPLING
    from tuner.quality.proxy_record import record_proxy
    from tuner.search.config import resolve_config

    for model, own in (("infinity-test", INFINITY_SAMPLING), ("tiny", SAMPLING)):
        cfg = resolve_config(model=model, mem_target="50%", out="unused")
        assert (cfg.cfg, cfg.top_k, cfg.top_p) == (own.cfg, own.top_k, own.top_p)
    assert resolve_config(model="infinity-test", mem_target="50%", out="unused", cfg=1.0).cfg == 1.0
    loaded = load_model("infinity-test", random_weights=True, sides=(1, 2))
    assert calibrate(loaded, samples=1).spec.cfg == 3.0
    assert record_proxy(loaded).spec.top_p == 0.97


def test_python_api_generates_what_the_cli_generates(tmp_path, cache_dir):
    """`tuner.generate(model, prompts=...)` is `tuner generate --prompt ...`: the same samples.npz, with
    and without a policy file; classes index the model's prompt set; bad input is one line."""
    import torch

    import tuner
    from tuner.errors import UserError

    model = tuner.load_model("infinity-test", random_weights=True, sides=(1, 2, 4))
    assert model.kind == "infinity" and model.num_classes == 0 and "text-to-image" in repr(model)
    assert run("presets", *SMALL, "--mem-target", "60%", "--out", tmp_path / "pre").exit_code == 0
    for policy in (None, tmp_path / "pre" / "scalekv_10.json"):
        out = tmp_path / f"cli-{policy is None}"
        flags = ("--policy", policy) if policy is not None else ()
        r = run("generate", *SMALL, "--prompt", "a red fox", "--prompt", "a cat", "--batch-size", 1,
                "--seed", 5, "--out", out, *flags)
        assert r.exit_code == 0, r.output
        images = tuner.generate(model, prompts=["a red fox", " a cat "], policy=policy, seed=5, batch_size=1)
        assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
        assert np.array_equal(np.load(out / "samples.npz")["images"], images.numpy())
    builtin = tuner.generate(model, list(range(8)))  # the first 8 built-in prompts: the CLI's default
    r = run("generate", *SMALL, "--out", tmp_path / "default")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "default" / "samples.npz")["images"], builtin.numpy())
    for kwargs, match in (({}, "pass prompts"), ({"prompts": [""]}, "non-empty text"),
                          ({"classes": [99]}, "must index infinity-test's 16 prompts")):
        with pytest.raises(UserError, match=match) as err:
            tuner.generate(model, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="class-conditional"):
        tuner.generate(tuner.load_model("tiny"), prompts="a cat")


@pytest.mark.slow  # Inception-v3 at 299² on the CPU
def test_evaluate_measures_fid_vs_full_with_local_inception_weights(tmp_path, cache_dir):
    """ScaleKV and HeatKV measure Infinity with PSNR, SSIM and FID against the full cache: with an
    Inception-v3 weights file (here random weights of the standard layout) `tuner evaluate` reports
    fid_vs_full on the paired images next to PSNR/SSIM."""
    import torch

    from tuner.quality.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    r = run("evaluate", *SMALL, "--policy", "scalekv_10", "--samples", "4", "--json",
            "--inception-weights", weights)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["fid_vs_full"] is not None and m["fid_vs_full"] >= 0 and m["samples"] == 4
    assert 0 < m["ssim"] <= 1


def test_calibrate_and_presets_read_the_users_prompts(tmp_path, cache_dir):
    """Calibration (and the presets it places) runs over --prompts FILE: other prompts, other text
    features, another calibration, not the cached one of the built-in prompts."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse at night\na bowl of ramen\n")
    own = run("calibrate", *SMALL, "--samples", "2", "--prompts", prompts, "--out", tmp_path / "own")
    built_in = run("calibrate", *SMALL, "--samples", "2", "--out", tmp_path / "built_in")
    assert own.exit_code == 0 and built_in.exit_code == 0, own.output + built_in.output
    a = json.loads((tmp_path / "own" / "calibration.json").read_text())
    b = json.loads((tmp_path / "built_in" / "calibration.json").read_text())
    assert a["key_similarity"] != b["key_similarity"] and a["checkpoint_sha256"] != b["checkpoint_sha256"]
    r = run("presets", *SMALL, "--prompts", prompts, "--calibration-samples", "2", "--out", tmp_path / "pre")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pre" / "scalekv_10.json").is_file()
    for cmd in ("calibrate", "presets"):
        assert_user_error(run(cmd, "--model", "tiny", "--prompts", prompts, "--out", tmp_path / "x"),
                          "--prompts needs a text-to-image model")
    assert not (tmp_path / "x").exists()
