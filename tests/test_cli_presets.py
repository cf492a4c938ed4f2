"""`tuner presets`: every paper preset and baseline as a policy file that `generate`/`bench` apply
with the planned bytes; fitted to a memory target on request; the shipped tiny presets load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli_generate import assert_user_error, ckpt_args, run

PRESET_NAMES = {"ams", "window_at_ams", "sink_window_at_ams", "scalekv_10", "window_at_scalekv_10",
                "sink_window_at_scalekv_10", "scalekv_20", "window_at_scalekv_20",
                "sink_window_at_scalekv_20", "hack", "window_at_hack", "sink_window_at_hack", "heatkv",
                "window_at_heatkv", "sink_window_at_heatkv"}
SHIPPED = Path(__file__).resolve().parents[1] / "tuner" / "assets" / "presets" / "tiny"


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))


def test_every_preset_file_generates_with_the_planned_kv_bytes(tmp_path, small_ckpts):
    out = tmp_path / "presets"
    r = run("presets", *ckpt_args(small_ckpts), "--calibration-samples", "2", "--out", out)
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.json"))
    assert {f.stem for f in files} == PRESET_NAMES
    for f in files:
        doc = json.loads(f.read_text())
        assert doc["provenance"]["preset"] == f.stem.replace("_at_", "@")
        g = run("generate", *ckpt_args(small_ckpts), "--policy", f, "--classes", "1,2", "--out",
                tmp_path / f.stem)
        assert g.exit_code == 0, g.output
        b = run("bench", *ckpt_args(small_ckpts), "--policy", f, "--batch", "2", "--warmup", "0", "--repeats",
                "1", "--device", "cpu", "--json")
        assert b.exit_code == 0, b.output
        res = json.loads(b.output)
        assert res["kv_bytes_allocated"] == res["kv_bytes_planned"]
        assert abs(res["memory_fraction"] - doc["memory"]["fraction"]) < 1e-12


def test_presets_fitted_to_a_target_use_at_most_that_memory(tmp_path):
    out = tmp_path / "p15"
    r = run("presets", "--model", "tiny", "--mem-target", "15%", "--out", out)
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.json"))
    families = {json.loads(f.read_text())["policy"]["family"] for f in files}
    # duplicates after fitting are dropped
    assert families == {"ams", "scalekv", "window", "sink_window", "hack", "heatkv"}
    for f in files:
        v = run("policy", "validate", f, "--model", "tiny")
        assert v.exit_code == 0, v.output
        frac = json.loads(f.read_text())["memory"]["fraction"]
        assert 0.12 < frac <= 0.15, (f.name, frac)


def test_presets_bad_input(tmp_path):
    assert_user_error(run("presets", "--mem-target", "150%", "--out", tmp_path / "x"), "--mem-target")
    assert_user_error(run("presets", "--calibration-samples", "0", "--out", tmp_path / "y"),
                      "--calibration-samples")


def test_shipped_tiny_presets_load_for_tiny_and_are_refused_for_d16():
    files = sorted(SHIPPED.glob("*.json"))
    assert {f.stem for f in files} == PRESET_NAMES
    for f in files:
        assert run("policy", "validate", f, "--model", "tiny").exit_code == 0
    assert_user_error(run("policy", "validate", SHIPPED / "ams.json", "--model", "d16"))
