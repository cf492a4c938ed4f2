"""Policy files: round trip for every family, and every refusal is a one-line UserError with a fix."""
from __future__ import annotations

import json

import pytest

from tests.policies.cases import CASES, case_ids, concrete_params
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
    case = CASES[family][index]
    policy = make_policy(family, concrete_params(case, G.num_layers, G.num_scales))
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
