"""`tuner evaluate` on the shipped tiny model end to end, its bad inputs, and the evaluator's reference
cache."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app
from tuner.cli.evaluate_cmd import progress_bar

runner = CliRunner()
METRIC_KEYS = {"memory_fraction", "kv_bytes_per_image", "fid_vs_full", "fid", "delta_fid", "psnr", "ssim",
               "latency_s_per_image", "full_latency_s_per_image", "samples"}


@pytest.fixture(scope="module", autouse=True)
def calibration_cache(tmp_path_factory):
    """Presets need calibration statistics: compute them once for this module, outside the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def run(*args):
    return runner.invoke(build_app(), ["evaluate", "--model", "tiny", "--device", "cpu", *map(str, args)])


def test_preset_json_run_reports_memory_and_paired_quality():
    r = run("--policy", "scalekv_10", "--samples", 4, "--batch-size", 2, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # stdout is pure JSON: no progress bar, no log lines
    assert out["model"] == "tiny" and out["family"] == "scalekv"
    assert METRIC_KEYS <= set(out)
    assert 0 < out["memory_fraction"] < 1
    assert out["kv_bytes_per_image"] > 0
    assert math.isfinite(out["psnr"]) and 5 < out["psnr"] < 60  # the policy changes the images, not wildly
    assert 0 < out["ssim"] < 1
    assert out["fid_vs_full"] > 0 and out["latency_s_per_image"] > 0
    assert out["samples"] == 4


def test_full_policy_is_identical_to_the_full_cache():
    # Human-readable output with the progress bar on: the bar goes to stderr, stdout holds the metrics.
    r = run("--policy", "full", "--samples", 4, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    metrics = {}
    for line in r.stdout.strip().splitlines():
        key, value = line.split(":")
        metrics[key.strip()] = float(value)
    assert METRIC_KEYS <= set(metrics), r.stdout
    assert metrics["memory_fraction"] == 1.0
    assert metrics["psnr"] == math.inf
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["fid_vs_full"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["delta_fid"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_samples(n):
    assert_user_error(run("--policy", "full", "--samples", n), f"--samples {n}", "positive")


def test_non_positive_batch_size():
    assert_user_error(run("--policy", "full", "--samples", 4, "--batch-size", 0), "--batch-size 0",
                      "positive")


def test_unknown_policy_name_lists_the_presets():
    assert_user_error(run("--policy", "no_such_policy", "--samples", 2), "unknown policy 'no_such_policy'",
                      "scalekv_10")


def test_missing_reference_file(tmp_path):
    missing = tmp_path / "nope.npz"
    assert_user_error(run("--policy", "full", "--samples", 2, "--reference", missing), str(missing),
                      "not found")


def test_reference_of_the_wrong_resolution(tmp_path):
    ref = tmp_path / "ref64.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8))  # guided-diffusion layout
    assert_user_error(run("--policy", "full", "--samples", 2, "--reference", ref), "64×64", "32×32")


def test_progress_bar_hooks_the_evaluator_only_while_enabled():
    class Fake:
        progress = None

    ev = Fake()
    with progress_bar(ev, 4, disable=True):
        assert ev.progress is None
    with progress_bar(ev, 4, disable=False):
        assert callable(ev.progress)
        ev.progress("full cache", 2)
        ev.progress("policy", 2)
    assert ev.progress is None


def test_full_cache_reference_is_generated_once_per_spec():
    from tuner.quality.evaluate import EvalSpec, build_evaluator

    ev = build_evaluator("tiny", device="cpu")
    batches = []
    ev.progress = lambda phase, n: batches.append((phase, n))
    spec = EvalSpec.balanced(10, 4, seed=3, batch_size=2)
    first = ev.evaluate("window", {"window": 2}, spec)
    assert batches == [("full cache", 2), ("full cache", 2), ("policy", 2), ("policy", 2)]
    assert ev.reference_hits == 0
    second = ev.evaluate("sink_window", {"sink_scales": 1, "window": 1}, spec)
    assert batches[4:] == [("policy", 2), ("policy", 2)]  # no full-cache batch regenerated
    assert ev.reference_hits == 1
    # the same cached reference
    assert first["full_latency_s_per_image"] == second["full_latency_s_per_image"]
    ev.evaluate("window", {"window": 2},
                EvalSpec.balanced(10, 4, seed=4, batch_size=2))  # other seeds: new ref
    assert [p for p, _ in batches[6:]].count("full cache") == 2
