"""Fixtures of the API tests: the small official-format checkpoints loaded through ``tuner.load_model``,
policy files of every family the drop-in is checked with (real calibration embedded), and a fresh
official-structure VAR (tests/api/official_modules.py) on the same weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import tuner
from tests.api.official_modules import official_var

# name -> preset of tuner.presets.paper_presets (or "full"), and an optional storage format
POLICIES = {
    "full": ("full", None),
    "window": ("window@ams", None),
    "ams": ("ams", None),
    "scalekv": ("scalekv_10", None),
    "ams_int4": ("ams", "int4"),
    "sink_window_int8": ("sink_window@scalekv_10", "int8"),
}


@pytest.fixture(scope="session")
def api_model(small_ckpts):
    torch.set_num_threads(1)
    return tuner.load_model(small_ckpts)


@pytest.fixture(scope="session")
def policy_files(api_model, tmp_path_factory):
    """``name -> path`` of a policy file for ``api_model`` (see :data:`POLICIES`)."""
    from tuner.calibration import calibrate
    from tuner.policies.full import FullPolicy
    from tuner.policy_file import write_policy_file
    from tuner.presets import paper_presets

    m = api_model
    cal = calibrate(m.var, m.vae, m.config, samples=2, checkpoint_sha256=m.checkpoint_sha256)
    presets = paper_presets(m.config, cal)
    d = tmp_path_factory.mktemp("policies")
    out = {}
    for name, (preset, fmt) in POLICIES.items():
        policy = FullPolicy() if preset == "full" else presets[preset]
        if fmt is not None:
            policy = dataclasses.replace(policy, kv_format=fmt)
        out[name] = write_policy_file(d / f"{name}.json", policy, m.config,
                                      checkpoint_sha256=m.checkpoint_sha256,
                                      calibration=cal, dtype="fp32")
    return out


@pytest.fixture
def official(api_model):
    """A fresh official-structure VAR holding ``api_model``'s weights (strict load)."""
    return official_var(api_model.config, api_model.vae, api_model.var.state_dict())
