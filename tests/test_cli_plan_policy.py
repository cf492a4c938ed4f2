"""`tuner plan`, `tuner policy show/validate`: exact figures and one-line errors for bad input."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app

runner = CliRunner()


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


@pytest.mark.parametrize("model,full_bytes", [("d16", 89_128_960), ("d20", 139_264_000), ("d24", 200_540_160),
                                              ("d30", 313_344_000), ("d36", 1_486_356_480)])
def test_plan_full_cache_matches_design(model, full_bytes):
    r = run("plan", "--model", model, "--family", "full", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["kv_bytes_per_image"] == full_bytes and data["fraction"] == 1.0


def test_plan_scalekv_10_on_d30_is_about_ten_percent():
    r = run("plan", "--model", "d30", "--family", "scalekv", "--param", "budget_fraction=0.1", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert 0.09 < data["fraction"] < 0.12 and "placeholder" in data["note"]


def test_plan_max_batch_is_reported():
    r = run("plan", "--model", "d30", "--family", "ams", "--gpu-mem", "80GiB", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert "batch" in r.output.lower()


def test_plan_quantized_storage_counts_16_bit_reference_and_fits_more_images():
    full = json.loads(run("plan", "--model", "d30", "--family", "full", "--json").output)
    r = run("plan", "--model", "d30", "--family", "full", "--param", "kv_format=int8", "--json",
            "--dtype", "fp32", "--gpu-mem", "80GiB")
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)
    assert q["kv_formats"] == ["int8"] * 30 and q["fraction"] == pytest.approx(66 / 128)
    assert q["kv_bytes_per_image"] == full["kv_bytes_per_image"] * 66 // 128  # no compute buffer at all
    r16, r8 = (json.loads(run("plan", "--model", "d30", "--family", "full", "--gpu-mem", "80GiB", "--json",
                              *extra).output) for extra in ((), ("--param", "kv_format=int8")))
    assert r8["max_batch"] > 1.4 * r16["max_batch"]  # KV halves; the VAE decoder's activations stay
    text = run("plan", "--model", "tiny", "--family", "window", "--param",
               'kv_format=["int4","compute"]').output
    assert "| 0 | int4 |" in text and "| 5 | compute |" in text and "int4 ×3, compute ×3 layers" in text
    bad = run("plan", "--model", "tiny", "--family", "window", "--param", "kv_format=int2")
    assert bad.exit_code == 2 and "unknown KV format 'int2'" in bad.output


@pytest.mark.parametrize("args,fragment", [
    (["--family", "window", "--param", "window=0"], "window"),
    (["--family", "ams", "--param", "n_condensed=10"], "n_condensed"),
    (["--family", "ams", "--param", "theta_quantile=1.5"], "theta_quantile"),
    (["--family", "scalekv", "--param", "budget_fraction=0"], "budget_fraction"),
    (["--family", "budgets", "--param", "table=[[-1]]"], "budget"),
    (["--family", "nope"], "unknown policy family"),
    (["--family", "window", "--param", "window"], "name=value"),
    ([], "exactly one of"),
])
def test_plan_bad_input(args, fragment):
    assert_user_error(run("plan", "--model", "d16", *args), fragment)


@pytest.fixture()
def policy_file(tmp_path):
    from tuner.model.config import model_config
    from tuner.policies.registry import make_policy
    from tuner.policy_file import write_policy_file

    return write_policy_file(tmp_path / "p.json", make_policy("window", {"window": 2}), model_config("d16"))


def test_policy_show_and_validate(policy_file, tmp_path):
    r = run("policy", "show", policy_file, "--heatmap", tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "h.png").stat().st_size > 1000
    r = run("policy", "validate", policy_file, "--model", "d16")
    assert r.exit_code == 0 and r.output.startswith("ok:"), r.output


def test_policy_validate_refuses_other_model(policy_file):
    assert_user_error(run("policy", "validate", policy_file, "--model", "d30"), "d16")


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(schema_version=99), "schema"),
    (lambda d: d["policy"].update(family="magic"), "family"),
    (lambda d: d["budgets"][0].__setitem__(0, 10_000), "budget"),
])
def test_policy_validate_bad_files(policy_file, mutate, fragment):
    doc = json.loads(policy_file.read_text())
    mutate(doc)
    policy_file.write_text(json.dumps(doc))
    assert_user_error(run("policy", "validate", policy_file, "--model", "d16"), fragment)


def test_policy_partial_json(policy_file):
    policy_file.write_text(policy_file.read_text()[:100])
    assert_user_error(run("policy", "validate", policy_file, "--model", "d16"), "JSON")
