"""Search-space files: validation with line numbers, symbolic bounds, conditional/derived/repeated
parameters, union via include, suggestion through Optuna and preset round trips."""
from __future__ import annotations

import textwrap

import pytest

from tuner.errors import UserError
from tuner.model.config import model_config
from tuner.policies.base import CacheGeometry
from tuner.search.space_files import load_space

TINY = CacheGeometry.from_var_config(model_config("tiny").var)  # 6 layers, 7 scales, 155 tokens


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


GOOD = """
schema_version: 1
families:
  toy:
    params:
      window: {type: int, low: 1, high: "num_scales - 2"}
      odd_layers_half: {type: categorical, choices: [false, true]}
      _pick: {type: int, low: 0, high: 1}
      tag: {type: categorical, choices: [a, b], when: "window > 3", default: a}
"""


def test_good_space_binds_symbols_to_the_model(tmp_path):
    space = load_space(write(tmp_path, GOOD), TINY)
    assert space.family_names == ["toy"]
    window = space.family("toy").params[0]
    assert (window.kind, window.low, window.high, window.line) == ("int", 1, 5, 5)
    d30 = load_space(write(tmp_path, GOOD), CacheGeometry.from_var_config(model_config("d30").var))
    assert d30.family("toy").params[0].high == 8


def test_suggest_through_optuna_respects_conditions(tmp_path):
    import optuna

    space = load_space(write(tmp_path, GOOD), TINY)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        t = study.ask()
        family, params = space.suggest(t)
        assert family == "toy" and set(params) == {"window", "odd_layers_half", "tag"}  # helper _pick dropped
        assert 1 <= params["window"] <= 5
        assert ("toy.tag" in t.params) == (params["window"] > 3)  # conditional: only suggested when active
        if params["window"] <= 3:
            assert params["tag"] == "a"  # default
        seen.append(params["window"])
        study.tell(t, 0.0)
    assert len(set(seen)) >= 4


def test_preset_round_trip(tmp_path):
    space = load_space(write(tmp_path, GOOD), TINY)
    params = {"window": 4, "odd_layers_half": True, "tag": "b"}
    assert space.trial_params("toy", params) == {"toy.window": 4, "toy.odd_layers_half": True, "toy.tag": "b",
                                                 "toy._pick": 0}  # helper: first value that round-trips
    assert space.trial_params("toy", {**params, "window": 9}) is None  # outside the range
    assert space.trial_params("toy", {**params, "window": 2}) is None  # tag b unreachable when window <= 3
    assert space.trial_params("ams", params) is None


def test_inactive_parameters_read_as_none_and_keep_the_policy_default(tmp_path):
    p = write(tmp_path, """
    families:
      toy:
        params:
          _capped: {type: categorical, choices: [false, true]}
          _w: {type: int, low: 1, high: 3, when: _capped}
        derived:
          window: "_w + 1 if _capped else 5"
    """)
    space = load_space(p, TINY)

    class Pick:
        def __init__(self, capped):
            self.capped = capped

        def suggest_categorical(self, name, choices):
            return self.capped

        def suggest_int(self, name, low, high, **_):
            return high

    assert space.suggest(Pick(False)) == ("toy", {"window": 5})
    assert space.suggest(Pick(True)) == ("toy", {"window": 4})
    assert space.trial_params("toy", {"window": 3}) == {"toy._capped": True, "toy._w": 2}
    assert space.trial_params("toy", {"window": 5}) == {"toy._capped": False, "toy._w": 1}
    assert space.trial_params("toy", {"window": 9}) is None


def test_repeat_derived_fixed_and_include(tmp_path):
    write(tmp_path, """
    families:
      toy:
        params:
          _w: {type: int, low: 1, high: 2, repeat: num_layers}
        derived:
          window: "max(_w) + 1"
        fixed:
          tag: b
    """, name="toy.yaml")
    union = write(tmp_path, "include: [toy.yaml]\nfamilies:\n  full: {}\n", name="all.yaml")
    space = load_space(union, TINY)
    assert space.family_names == ["toy", "full"]

    class Mid:
        def suggest_int(self, name, low, high, **_):
            return high if name.endswith(".0") else low

        def suggest_categorical(self, name, choices):
            return "toy"

    family, params = space.suggest(Mid())
    assert (family, params) == ("toy", {"window": 3, "tag": "b"})


@pytest.mark.parametrize("body, line, message", [
    ("families:\n  toy:\n    params:\n      window: {type: int, low: 1, hgh: 3}\n", 4, "hgh: unknown key"),
    ("families:\n  nope: {}\n", 2, "families.nope: unknown policy family"),
    ("families:\n  toy:\n    params:\n      windows: {type: int, low: 1, high: 3}\n", 4,
     "toy policies have no parameter 'windows'"),
    ("families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: num_scale}\n", 4,
     "unknown name 'num_scale'"),
    ("families:\n  toy:\n    params:\n      window:\n        type: int\n        low: 5\n        high: 2\n", 4,
     "empty range: low 5 > high 2"),
    ("families:\n  toy:\n    params:\n      window: {type: integer, low: 1, high: 3}\n", 4,
     "type must be int"),
    ("families:\n  toy:\n    params:\n      tag: {type: categorical, choices: []}\n", 4, "non-empty list"),
    ("families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 3, when: 'tag == 1'}\n", 4,
     "unknown name 'tag'"),
    ("families:\n  toy:\n    params:\n      window: {type: int, low: \"__import__('os')\", high: 3}\n", 4,
     "only calls of"),
    ("families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 3\n", 5, "invalid YAML"),
    ("schema_version: 2\nfamilies: {}\n", 1, "unsupported schema_version"),
    ("families: {}\nextra: 1\n", 2, "extra: unknown key"),
    ("include: [missing.yaml]\n", 1, "included file missing.yaml does not exist"),
    ("families: {}\n", 1, "defines no families"),
    ("- a\n- b\n", 1, "must be a mapping"),
])
def test_malformed_spaces_name_file_and_line(tmp_path, body, line, message):
    p = write(tmp_path, body)
    with pytest.raises(UserError) as info:
        load_space(p, TINY)
    text = str(info.value)
    assert text.startswith(f"{p}:{line}: "), text
    assert message in text and "\n" not in text
