"""Policy files: round trip for every family, and every refusal is a one-line UserError with a fix."""
from __future__ import annotations

import json

import pytest

from tests.policies.cases import build, case_ids
from tests.policies.helpers import synthetic_calibration
from tuner.errors import UserError
from tuner.memory import memory_report
from tuner.model.config import model_config
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.registry import make_policy
from tuner.policy_file import describe_policy_file, load_policy_file, write_policy_file

TINY = model_config("tiny")
G = CacheGeometry.from_var_config(TINY.var)
CAL = synthetic_calibration(G, seed=4, name="tiny")


def write(tmp_path, family="ams", params=None, **kw):
    policy = make_policy(family, params if params is not None else {})
    kw.setdefault("checkpoint_sha256", "ab" * 32)
    path = write_policy_file(tmp_path / "p.json", policy, TINY, spec=PolicySpec(G, "tiny", CAL), **kw)
    return policy, path


@pytest.mark.parametrize("family,index", case_ids())
def test_round_trip_every_family(tmp_path, family, index):
    policy, _ = build(family, index, G)
    path = write_policy_file(tmp_path / "p.json", policy, TINY, spec=PolicySpec(G, "tiny", CAL),
                             metrics={"fid_vs_full": 1.5}, provenance={"study": "s1", "trial": 7})
    loaded, info = load_policy_file(path, TINY, checkpoint_sha256=None)
    assert loaded == policy
    report = memory_report(policy, G, spec=PolicySpec(G, "tiny", CAL))
    assert info.plan == report.plan
    assert info.memory["kv_bytes_per_image"] == report.kv_bytes_per_image
    assert info.memory["fraction"] == pytest.approx(report.fraction)
    assert (info.calibration is not None) == policy.needs_calibration
    assert info.provenance["study"] == "s1" and info.provenance["tuner_version"] == "0.1.0"
    assert info.provenance["created"]
    assert "memory:" in describe_policy_file(loaded, info)


def test_provenance_eval_spec_and_hash(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Spec:
        labels: tuple = (1, 2)
        seed: int = 3

    _, path = write(tmp_path, eval_spec=Spec(), metrics={"psnr": 30.0})
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["eval_spec"] == {"labels": [1, 2], "seed": 3}
    assert doc["model"] == {"name": "tiny", "depth": 6, "patch_nums": [1, 2, 3, 4, 5, 6, 8], "num_heads": 4,
                            "head_dim": 32, "checkpoint_sha256": "ab" * 32}
    _, info = load_policy_file(path, TINY, checkpoint_sha256="ab" * 32)
    assert info.checkpoint_sha256 == "ab" * 32 and info.metrics == {"psnr": 30.0}


def edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d.pop("budgets"), "incomplete"),
    (lambda d: d.pop("schema_version"), "not a varkv-tuner policy file"),
    (lambda d: d["policy"].update(family="h2o"), "unknown policy family 'h2o'"),
    (lambda d: d["policy"]["params"].update(window=-3), "bad ams parameters"),
    (lambda d: d["policy"]["params"].update(colour="red"), "bad ams parameters"),
    (lambda d: d["budgets"][0].__setitem__(3, 29), "differs from what the ams parameters plan"),
    (lambda d: d["budgets"][0].__setitem__(3, 999), "does not fit the model"),
    (lambda d: d["memory"].update(kv_bytes_per_image=1), "does not match the plan"),
    (lambda d: d.update(calibration=None), "cannot be planned"),
    (lambda d: d["calibration"].update(num_layers=3), "embedded calibration is unusable"),
])
def test_refusals(tmp_path, mutate, match):
    _, path = write(tmp_path)
    edit(path, mutate)
    with pytest.raises(UserError, match=match) as info:
        load_policy_file(path, TINY)
    msg = str(info.value)
    assert "\n" not in msg and ("re-export" in msg or "upgrade" in msg)


@pytest.mark.parametrize("kv_format", ["int8", "int4", ["int8", "compute", "int4"]])
def test_quantized_policies_round_trip_and_show_their_storage(tmp_path, kv_format):
    policy, path = write(tmp_path, "sink_window", {"sink_scales": 2, "window": 7, "max_tokens": 20,
                                                   "kv_format": kv_format})
    doc = json.loads(path.read_text())
    assert doc["kv_formats"] == list(policy.layer_formats(G)) and len(doc["kv_formats"]) == 6
    loaded, info = load_policy_file(path, TINY)
    assert loaded == policy and info.plan.formats == policy.layer_formats(G)
    report = memory_report(policy, G)
    assert info.memory["fraction"] == pytest.approx(report.fraction) and report.fraction < 0.2
    shown = describe_policy_file(loaded, info)
    storage = next(line for line in shown.splitlines() if line.startswith("storage:"))
    assert all(f in storage for f in set(policy.layer_formats(G))) and "16-bit in deployment" not in shown


def test_an_older_file_without_formats_loads_as_the_16_bit_cache_it_was(tmp_path):
    policy, path = write(tmp_path, "window", {"window": 3})
    edit(path, lambda d: d.pop("kv_formats"))
    loaded, info = load_policy_file(path, TINY)
    assert loaded.kv_format == "compute" and info.plan.formats == () and loaded == policy
    assert "compute (every layer) (16-bit in deployment)" in describe_policy_file(loaded, info)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(kv_formats=["int3"] * 6), "unknown KV storage formats int3"),
    (lambda d: d.update(kv_formats=["int8"] * 5), "'kv_formats' has 5 entries"),
    (lambda d: d.update(kv_formats=[8] * 6), r"'kv_formats\[0\]' must be a string"),
    (lambda d: d.update(kv_formats=["int4"] * 6), "stored kv_formats differ"),  # params say int8
    (lambda d: d["policy"]["params"].update(kv_format="fp8"), "unknown KV format 'fp8'"),
])
def test_unknown_or_edited_formats_are_refused(tmp_path, mutate, match):
    _, path = write(tmp_path, "window", {"window": 3, "kv_format": "int8"})
    edit(path, mutate)
    with pytest.raises(UserError, match=match) as info:
        load_policy_file(path, TINY)
    assert "\n" not in str(info.value)


def test_refuses_malformed_json_and_missing_file(tmp_path):
    _, path = write(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(UserError, match="not valid JSON"):
        load_policy_file(path)
    with pytest.raises(UserError, match="cannot read policy file"):
        load_policy_file(tmp_path / "missing.json")


def test_refuses_another_model_and_another_checkpoint(tmp_path):
    _, path = write(tmp_path, family="window", params={"window": 2})
    with pytest.raises(UserError, match="is a policy for model tiny .* not d16.*pass --model tiny"):
        load_policy_file(path, model_config("d16"))
    with pytest.raises(UserError, match="tuned on checkpoint abababababab"):
        load_policy_file(path, TINY, checkpoint_sha256="cd" * 32)
    load_policy_file(path, TINY, checkpoint_sha256=None)  # unknown hash on one side: accepted
    _, path = write(tmp_path, family="window", params={"window": 2}, checkpoint_sha256=None)
    load_policy_file(path, TINY, checkpoint_sha256="cd" * 32)


# -- schema and size limits: every malformed field is one line naming the file and the field -----------

@pytest.mark.parametrize("field", ["model", "policy", "budgets", "memory", "full", "kind", "calibration",
                                   "metrics", "eval_spec", "provenance"])
@pytest.mark.parametrize("bad", [[], "x", 3, 1.5, True, None, {}])
def test_every_top_level_field_is_type_checked(tmp_path, field, bad):
    _, path = write(tmp_path)
    allowed = {"model": (dict,), "policy": (dict,), "budgets": (list,), "memory": (dict,), "full": (bool,),
               "kind": (str,), "calibration": (dict, type(None)), "metrics": (dict, type(None)),
               "eval_spec": (dict, type(None)), "provenance": (dict, type(None))}[field]
    if isinstance(bad, allowed):
        return  # a well-typed value: refused (or accepted) by the checks after the schema
    edit(path, lambda d: d.__setitem__(field, bad))
    with pytest.raises(UserError) as info:
        load_policy_file(path, TINY)
    msg = str(info.value)
    assert msg.startswith(f"{path}: field '{field}' must be "), msg
    assert "\n" not in msg and "re-export" in msg


@pytest.mark.parametrize("memory, fragment", [([], "field 'memory' must be an object, not an array"),
                                              ("x", "field 'memory' must be an object, not a string")])
def test_memory_of_the_wrong_type_is_a_user_error(tmp_path, memory, fragment):
    _, path = write(tmp_path)
    edit(path, lambda d: d.update(memory=memory))
    with pytest.raises(UserError, match=fragment):
        load_policy_file(path)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["model"].update(depth="6"), "field 'model.depth' must be an integer, not a string"),
    (lambda d: d["model"].update(depth=6.0), "field 'model.depth' must be an integer, not a number"),
    (lambda d: d["model"].pop("patch_nums"), "field 'model.patch_nums' is missing"),
    (lambda d: d["model"]["patch_nums"].__setitem__(0, "1"), "'model.patch_nums[0]' must be an integer"),
    (lambda d: d["model"].update(checkpoint_sha256=7), "'model.checkpoint_sha256' must be a string or null"),
    (lambda d: d["policy"].update(family=["ams"]), "field 'policy.family' must be a string, not an array"),
    (lambda d: d["policy"].update(params=[1]), "field 'policy.params' must be an object or null"),
    (lambda d: d["memory"].update(fraction="0.1"), "'memory.fraction' must be a finite number, not a string"),
    (lambda d: d["memory"].update(fraction=float("nan")),
     "'memory.fraction' must be a finite number, not NaN"),
    (lambda d: d["memory"].update(kv_bytes_per_image=float("inf")),
     "'memory.kv_bytes_per_image' must be a finite number, not inf"),
    (lambda d: d["memory"].pop("kv_bytes_per_image"), "field 'memory.kv_bytes_per_image' is missing"),
    (lambda d: d["memory"].update(dtype=16), "field 'memory.dtype' must be a string"),
    (lambda d: d["memory"].update(dtype="fp8"), "field 'memory.dtype' is 'fp8'; it must be one of fp16"),
    (lambda d: d["memory"].update(capacities={}), "field 'memory.capacities' must be an array"),
    (lambda d: d["memory"].update(fraction=0.001), "memory fraction 0.001 does not match the plan"),
    (lambda d: d["budgets"].__setitem__(0, 5), "field 'budgets[0]' must be an array (one row per layer)"),
    (lambda d: d["budgets"][1].__setitem__(2, 3.0), "field 'budgets[1][2]' must be an integer, not a number"),
    (lambda d: d.update(kind="something else"), "is not a varkv-tuner policy file (kind 'something else'"),
    (lambda d: d.update(metrics={"fid": [1]}), "field 'metrics.fid' must be a number, a string or null"),
    (lambda d: d.update(provenance={"quality_limit": "low"}),
     "field 'provenance.quality_limit' must be a finite number or null"),
    (lambda d: d.pop("memory"), "is incomplete (missing: memory)"),
])
def test_nested_fields_are_type_checked(tmp_path, mutate, fragment):
    _, path = write(tmp_path)
    edit(path, mutate)
    with pytest.raises(UserError) as info:
        load_policy_file(path, TINY)
    msg = str(info.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg, msg


@pytest.mark.timeout(20)
def test_deep_nesting_and_oversized_files_are_refused_before_use(tmp_path):
    from tuner.policy_schema import MAX_DEPTH, MAX_FILE_BYTES

    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)  # json.loads: RecursionError
    with pytest.raises(UserError, match=f"deep.json is nested deeper than {MAX_DEPTH} levels"):
        load_policy_file(path)
    _, good = write(tmp_path)
    nested = 1
    for _ in range(MAX_DEPTH + 1):
        nested = [nested]
    edit(good, lambda d: d.update(extra=nested))  # loads fine, but deeper than any policy file
    with pytest.raises(UserError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_policy_file(good)
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * MAX_FILE_BYTES + b"}")  # valid JSON, never parsed
    with pytest.raises(UserError, match=rf"big.json is {MAX_FILE_BYTES + 2} bytes, over the 4 MiB limit"):
        load_policy_file(big)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"schema_version": 1, "kind": "\xe9"}')
    with pytest.raises(UserError, match="latin.json is not UTF-8 text"):
        load_policy_file(latin)


def test_unknown_top_level_fields_are_allowed(tmp_path):
    policy, path = write(tmp_path)
    edit(path, lambda d: d.update(notes={"by": "a newer tuner"}))
    assert load_policy_file(path, TINY)[0] == policy


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, command", [("memory-array", "show"), ("memory-array", "validate"),
                                           ("deep", "show"), ("deep", "validate"), ("oversize", "validate")])
def test_cli_refuses_malformed_policy_files_with_one_line(tmp_path, case, command):
    import subprocess
    import sys
    from pathlib import Path

    _, path = write(tmp_path)
    if case == "memory-array":
        edit(path, lambda d: d.update(memory=[]))
        fragment = "field 'memory' must be an object, not an array"
    elif case == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
        fragment = "is nested deeper than"
    else:
        path.write_bytes(b" " * (5 << 20))
        fragment = "over the 4 MiB limit for policy files"
    args = [sys.executable, "-m", "tuner", "policy", command, str(path)]
    args += ["--model", "tiny"] if command == "validate" else []
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=root, timeout=100)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), proc.stderr
    assert fragment in lines[0], lines[0]


def test_a_winner_equal_to_the_full_cache_keeps_its_infinite_psnr_and_loads(tmp_path):
    """Images equal to the full cache's have PSNR +inf; JSON has no inf, so the file says "inf"
    (it used to write a bare Infinity that the schema then refused)."""
    cfg = model_config("tiny")
    from tuner.policies.full import FullPolicy

    path = write_policy_file(tmp_path / "p.json", FullPolicy(), cfg,
                             metrics={"psnr": float("inf"), "ssim": 1.0, "delta": float("-inf")})
    doc = json.loads(path.read_text())
    assert doc["metrics"] == {"psnr": "inf", "ssim": 1.0, "delta": "-inf"}
    policy, info = load_policy_file(path, cfg)
    assert info.metrics["psnr"] == "inf"
    assert "psnr inf" in describe_policy_file(policy, info)
