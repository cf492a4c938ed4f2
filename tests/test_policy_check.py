"""`tuner policy check`: committed references pass against themselves, worse policies fail (exit 1),
bad input is one `error:` line (exit 2). Quality is re-evaluated with the real tiny evaluator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app

runner = CliRunner()
POLICIES = Path(__file__).resolve().parents[1] / "policies"
REF_10 = POLICIES / "tiny-10pct.json"
FAST = ["--samples", "8", "--batch-size", "8"]


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


def hand_made(path: Path, family: str, params: dict, mem_target: str = "10%", **prov) -> Path:
    """A policy file for the shipped tiny weights recording ``mem_target`` like `tuner search` does."""
    from tuner.model.config import model_config
    from tuner.policies.registry import make_policy
    from tuner.policy_file import write_policy_file

    sha = json.loads(REF_10.read_text())["model"]["checkpoint_sha256"]
    provenance = {"mem_target": mem_target, "metric": "fid_vs_full", **prov}
    return write_policy_file(path, make_policy(family, params), model_config("tiny"), checkpoint_sha256=sha,
                             provenance=provenance)


def test_committed_references_are_valid_and_cover_the_shipped_targets():
    names = sorted(p.name for p in POLICIES.glob("*.json"))
    assert names == ["tiny-10pct.json", "tiny-15pct.json", "tiny-25pct.json"]
    for p in POLICIES.glob("*.json"):
        r = run("policy", "validate", p, "--model", "tiny")
        assert r.exit_code == 0 and r.output.startswith("ok:"), r.output
        doc = json.loads(p.read_text())
        target = int(p.stem.split("-")[1].removesuffix("pct")) / 100
        assert doc["provenance"]["mem_target"] == f"{round(100 * target)}%"
        assert doc["memory"]["fraction"] <= target


def test_committed_policies_pass_against_themselves():
    r = run("policy", "check", *sorted(POLICIES.glob("*.json")), "--reference", POLICIES, "--model", "tiny",
            *FAST)
    assert r.exit_code == 0, r.output
    assert r.output.count("  ok") == 3 and "REGRESSION" not in r.output, r.output
    rows = [ln.split() for ln in r.output.splitlines() if ln.startswith(str(POLICIES / "tiny-"))]
    # the target column, as the user wrote it
    assert [row[2] for row in rows] == ["10%", "15%", "25%"], r.output
    assert r.output.strip().splitlines()[-1].startswith("ok: 3 policies"), r.output


def test_worse_policies_fail_with_exit_1(tmp_path):
    # Same model and target as tiny-10pct: a one-token window (far lower quality, less memory) and a
    # two-scale window (better quality but several times the memory).
    low_quality = hand_made(tmp_path / "one-token.json", "window", {"window": 1, "max_tokens": 1})
    big = hand_made(tmp_path / "two-scales.json", "window", {"window": 2})
    r = run("policy", "check", REF_10, low_quality, big, "--reference", POLICIES, "--model", "tiny", *FAST)
    assert r.exit_code == 1, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.strip()}
    assert lines[str(REF_10)].rstrip().endswith("ok"), r.output
    assert ("REGRESSION:" in lines[str(low_quality)]
            and "psnr" in lines[str(low_quality)].split("REGRESSION")[1])
    assert "REGRESSION: memory" in lines[str(big)], r.output
    assert "2 regression(s) in 3 policies" in r.output


def test_tolerance_flags_change_the_verdict(tmp_path):
    big = hand_made(tmp_path / "two-scales.json", "window", {"window": 2})
    r = run("policy", "check", big, "--reference", REF_10, "--mem-tol", "1.0", "--fid-tol", "100", *FAST)
    assert r.exit_code == 0, r.output


def test_malformed_candidate_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_user_error(run("policy", "check", bad, "--reference", POLICIES, *FAST), "not valid JSON")


def test_candidate_without_reference_is_a_user_error_unless_allowed(tmp_path):
    other = hand_made(tmp_path / "p33.json", "window", {"window": 1}, mem_target="33%")
    assert_user_error(run("policy", "check", other, "--reference", POLICIES, *FAST), "no reference policy",
                      "--allow-new")
    r = run("policy", "check", other, "--reference", POLICIES, "--allow-new", *FAST)
    assert r.exit_code == 0 and "new (no reference)" in r.output, r.output


@pytest.mark.parametrize("args,fragment", [
    (["--metric", "accuracy"], "--metric"),
    (["--samples", "1"], "--samples"),
    (["--guard-metrics", "psnr,accuracy"], "--guard-metrics"),
    (["--psnr-tol", "-1"], "tolerances"),
    (["--model", "d30"], "not d30"),
])
def test_bad_flags_are_user_errors(args, fragment):
    assert_user_error(run("policy", "check", REF_10, "--reference", POLICIES, *args), fragment)


def test_missing_target_and_missing_reference_dir(tmp_path):
    untargeted = hand_made(tmp_path / "u.json", "window", {"window": 1}, mem_target="")
    assert_user_error(run("policy", "check", untargeted, "--reference", POLICIES), "no search target")
    assert_user_error(run("policy", "check", REF_10, "--reference", tmp_path / "nope"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run("policy", "check", REF_10, "--reference", empty), "no reference policy files")
