"""Search-space files are user input: every size/cost bomb (YAML aliases, huge files, deep nesting,
expensive expressions, huge repeats and counts) is refused with one ``file:line:`` UserError before
any work is spent on it or any study exists, and the shipped spaces still load unchanged.

No wall-clock assertions: without the limits these tests hang or run out of memory, which the
per-test timeout turns into a failure.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.model.config import NAMED_MODELS, model_config
from tuner.policies.base import CacheGeometry
from tuner.search import expr
from tuner.search.space_files import load_space, space_dir
from tuner.search.space_schema import MAX_CHOICES, MAX_FILES, MAX_PARAMS, MAX_REPEAT, MAX_TOTAL_CHOICES
from tuner.search.yaml_lines import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

TINY = CacheGeometry.from_var_config(model_config("tiny").var)
ROOT = space_dir().parent


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def refused(path, *needles, line=None, at=None):
    """load_space(path) raises one line ``<at or path>:<line>: ...`` containing every needle; returns it."""
    with pytest.raises(UserError) as info:
        load_space(path, TINY)
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith(f"{at or path}:{'' if line is None else line}"), text
    for needle in needles:
        assert needle in text, text
    return text


def alias_bomb() -> str:
    """Billion laughs: 9 levels of 9 aliases each, ~9**9 = 387 million strings once expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nfamilies: {}\n"


@pytest.mark.timeout(20)
def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path):
    text = alias_bomb()
    assert len(text.encode()) < 500
    p = write(tmp_path, text)
    refused(p, "YAML aliases (*a0) are not allowed", "write the value out in full", line="2:")


@pytest.mark.timeout(20)
def test_every_alias_is_refused_even_a_merge_key(tmp_path):
    p = write(tmp_path, """
    defaults: &d {type: int, low: 1, high: 3}
    families:
      toy:
        params:
          window: {<<: *d}
    """)
    refused(p, "YAML aliases (*d) are not allowed", line="5:")
    p = write(tmp_path, "families:\n  toy:\n    params:\n      window: &w {type: int, low: 1, high: 3}\n")
    assert load_space(p, TINY).family("toy").params[0].high == 3  # a lone anchor costs nothing: fine


@pytest.mark.timeout(20)
def test_oversized_file_is_refused_before_parsing(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text("families: [unclosed\n" + "#" * MAX_FILE_BYTES)  # invalid YAML: never parsed
    refused(p, f"over the {MAX_FILE_BYTES} byte", "limit for search-space files", "make it smaller",
            line="1:")


@pytest.mark.timeout(20)
def test_node_count_and_nesting_are_bounded(tmp_path):
    p = write(tmp_path, "families: {}\nnoise: [" + ", ".join(["1"] * (MAX_NODES + 10)) + "]\n")
    refused(p, f"more than {MAX_NODES} YAML nodes", "make it smaller")
    p = write(tmp_path, "families: {}\nnoise: " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(p, f"nested more than {MAX_DEPTH} levels deep", "flatten it", line="2:")


@pytest.mark.timeout(20)
def test_values_that_break_the_yaml_constructor_are_user_errors(tmp_path):
    p = write(tmp_path, "families: {}\nbig: " + "9" * 5000 + "\n")  # over Python's int-string limit
    refused(p, "invalid YAML value", line="2:")
    p = write(tmp_path, "families: {}\nwhen: 2024-13-45\n")
    refused(p, "invalid YAML value (month must be in 1..12)", line="2:")
    p = tmp_path / "bytes.yaml"
    p.write_bytes(b"families: {}\nx: \xff\xfe\n")
    refused(p, "invalid YAML", "UTF-8", line="2:")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("bound, message", [
    ('len("x" * 10**15)', "repetition of length 1 by 1000000000000000 would be longer than the limit"),
    ("((((10**64)**64)**64)**64)", "10 ** 64 is too large (over the limit of 10**18)"),
    ("2 ** 10**6", "too large"),
    ("9 ** 64 ** 64", "too large"),
    ("10**19", "integer result over the limit of 10**18"),
    ("len(scale_lengths * 10**12)", "would be longer than the limit of 10000"),
    ("len('ab' * 6000)", "would be longer than the limit of 10000"),
    ("len(('x' * 9000) + ('y' * 9000))", "concatenation would be 18000 long"),
    ("len('%0999999999d' % 1)", "string formatting with % is not allowed"),
    ("round(5, -10**9)", "round() to -1000000000 digits is too many"),
    ("sum(((1,) * 10000,) * 10000, ())", "tuples may hold only numbers, strings and None"),
    ("1" * 30, "integer constant over the limit of 10**18"),
    ("-" * 900 + "1", "too complex (nesting deeper than"),
    ("+".join(["1"] * 600), "over the limit of 1000"),
    ("ceil(1e300)", "integer result over the limit of 10**18"),
])
def test_expensive_expressions_are_refused_before_they_run(tmp_path, bound, message):
    head = "families:\n  toy:\n    params:\n"
    p = write(tmp_path, head + f"      window: {{type: int, low: 1, high: {json.dumps(bound)}}}\n")
    refused(p, "families.toy.params.window.high: expression", message, line="4:")


@pytest.mark.timeout(20)
def test_expression_limits_in_derived_and_when_hold_at_suggest_time(tmp_path):
    p = write(tmp_path, """
    families:
      toy:
        params:
          _n: {type: int, low: 1, high: 3}
        derived:
          window: "len('x' * 10**_n ** 15)"
    """)
    space = load_space(p, TINY)  # only names are checked at load time; the evaluator is bounded

    class High:
        def suggest_int(self, name, low, high, **_):
            return high

    with pytest.raises(expr.ExprError, match="too large|longer than the limit"):
        space.suggest(High())


def test_expression_limits_leave_room_for_real_expressions():
    env = {"num_scales": 10, "scale_lengths": (1, 4, 9), "num_layers": 30}
    assert expr.evaluate("10 ** 18", env) == 10**18
    assert expr.evaluate("2 ** 58 + 3 ** 37", env) == 2**58 + 3**37
    assert expr.evaluate("(1.0,) * (num_scales - 1)", env) == (1.0,) * 9
    assert expr.evaluate("len((0,) * 10000)", env) == 10000
    assert expr.evaluate("sum(scale_lengths) + round(2.567, 2)", env) == pytest.approx(16.57)
    assert expr.evaluate("num_layers % 7", env) == 2
    assert expr.evaluate("10 ** 64.0", env) == 1e64  # floats cannot blow up memory: allowed
    assert expr.evaluate("2 ** -3", env) == 0.125


@pytest.mark.timeout(20)
def test_repeat_choices_and_parameter_counts_are_bounded(tmp_path):
    p = write(tmp_path, """
    families:
      toy:
        params:
          _w: {type: float, low: 0.0, high: 1.0, repeat: 100000000}
    """)
    refused(p, f"repeat 100000000 is over the limit of {MAX_REPEAT}", "use a smaller repeat", line="4:")
    p = write(tmp_path, f"""
    families:
      toy:
        params:
          _w: {{type: float, low: 0.0, high: 1.0, repeat: "10**{len(str(MAX_REPEAT)) + 20}"}}
    """)
    refused(p, "is too large (over the limit of 10**18)")
    params = "".join(f"      _p{i}: {{type: int, low: 0, high: 1, repeat: {MAX_REPEAT}}}\n"
                     for i in range(MAX_PARAMS // MAX_REPEAT + 1))
    p = write(tmp_path, "families:\n  toy:\n    params:\n" + params)
    refused(p, f"more than {MAX_PARAMS} Optuna parameters", "use fewer or smaller repeats")
    many = ", ".join(str(i) for i in range(MAX_CHOICES + 1))
    head = "families:\n  toy:\n    params:\n"
    p = write(tmp_path, head + f"      _c: {{type: categorical, choices: [{many}]}}\n")
    refused(p, f"{MAX_CHOICES + 1} choices, over the limit of {MAX_CHOICES}", line="4:")
    some = ", ".join(str(i) for i in range(MAX_CHOICES))
    repeat = MAX_TOTAL_CHOICES // MAX_CHOICES + 1
    p = write(tmp_path, f"families:\n  toy:\n    params:\n"
                        f"      _c: {{type: categorical, choices: [{some}], repeat: {repeat}}}\n")
    refused(p, f"more than {MAX_TOTAL_CHOICES} categorical choices", line="4:")
    p = write(tmp_path, "families:\n  toy:\n    params:\n      window: {type: int, low: 1, high: 1e300}\n")
    refused(p, "over the limit of 1e18", line="4:")


@pytest.mark.timeout(20)
def test_include_fan_out_is_bounded(tmp_path):
    depth = 40  # each file includes the next one twice: 2**40 loads without a bound
    for i in range(depth):
        (tmp_path / f"l{i}.yaml").write_text(f"include: [l{i + 1}.yaml, l{i + 1}.yaml]\n")
    (tmp_path / f"l{depth}.yaml").write_text("description: leaf\n")
    last = tmp_path / f"l{MAX_FILES - 1}.yaml"  # the 32nd file loaded (depth first) may include no more
    refused(tmp_path / "l0.yaml", f"include.0: a space may load at most {MAX_FILES} files",
            "include fewer files", at=last, line="1:")
    big = "description: padded\n#" + "x" * (MAX_FILE_BYTES - 100) + "\n"
    (tmp_path / "big.yaml").write_text(big)
    p = write(tmp_path, "include: [big.yaml, big.yaml]\nfamilies:\n  toy: {}\n", name="two.yaml")
    refused(p, "including big.yaml", "with its includes (the limit)", line="1:")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", list(NAMED_MODELS))
def test_shipped_spaces_load_unchanged(model):
    g = model_config(model).geometry  # every named model, Infinity included
    for name in ("all", "ams", "scalekv", "budgets", "hack", "heatkv"):
        space = load_space(space_dir() / f"{name}.yaml", g)
        digest = hashlib.sha256()
        for source in space.sources:  # the digest (stored on studies) is still of the files' bytes
            digest.update(Path(source).read_bytes())
        assert space.digest == digest.hexdigest()[:16]
        expected = ["ams", "scalekv", "budgets", "hack", "heatkv"] if name == "all" else [name]
        assert space.family_names == expected
    budgets = load_space(space_dir() / "budgets.yaml", g).family("budgets")
    weights = next(p for p in budgets.params if p.name == "layer_weights")
    assert weights.repeat == g.num_layers
    assert dict(budgets.derived)["scale_curve"] == "(1.0,) * (num_scales - 1)"


@pytest.mark.timeout(60)
def test_search_cli_refuses_a_bomb_and_leaves_nothing_behind(tmp_path):
    space = tmp_path / "bomb.yaml"
    space.write_text("families:\n  budgets:\n    params:\n"
                     "      max_tokens: {type: int, low: 1, high: 8}\n"
                     "      layer_weights: {type: float, low: 0.25, high: 4.0, repeat: 100000000}\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tuner", "search", "--space", str(space), "--model", "tiny",
                           "--mem-target", "15%", "--workers", "0", "--out", str(out),
                           "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--mlflow-uri", "none"],
                          capture_output=True, text=True, cwd=ROOT, timeout=50)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr  # "error: --space FILE:5: ..."
    where = f"{space}:5: families.budgets.params.layer_weights.repeat: "
    assert where + "repeat 100000000 is over the limit" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]  # no run dir, no study.db


def test_keys_with_line_breaks_keep_the_message_on_one_line(tmp_path):
    p = write(tmp_path, 'families:\n  toy:\n    params:\n      "win\\ndow": {type: int, low: 1, high: 3}\n')
    refused(p, "families.toy.params.'win\\ndow': parameter names must be identifiers", line="4:")


def test_preset_inversion_work_is_bounded(tmp_path, monkeypatch):
    from tuner.search import space as space_mod

    p = write(tmp_path, """
    families:
      toy:
        params:
          _h: {type: int, low: 0, high: 3, repeat: 2}
          window: {type: int, low: 1, high: 5}
    """)
    space = load_space(p, TINY)
    assert space.trial_params("toy", {"window": 2}) is not None  # 16 combinations x 3 parameters
    monkeypatch.setattr(space_mod, "MAX_HELPER_WORK", 16 * 3 - 1)
    assert space.trial_params("toy", {"window": 2}) is None  # over the budget: not searched at all
