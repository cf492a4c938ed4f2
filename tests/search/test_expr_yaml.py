"""The space-file expression language and the line-aware YAML loader."""
from __future__ import annotations

import pytest

from tuner.errors import UserError
from tuner.search import expr
from tuner.search.yaml_lines import load_with_lines


def test_expressions_evaluate_with_model_symbols():
    env = {"num_scales": 10, "seq_len": 680, "scale_lengths": (1, 4, 9)}
    assert expr.evaluate("min(3, num_scales - 2)", env) == 3
    assert expr.evaluate("seq_len // 4 + scale_lengths[-1]", env) == 179
    assert expr.evaluate("num_scales > 5 and seq_len < 700", env) is True
    assert expr.evaluate("1 if num_scales == 3 else 2", env) == 2
    assert expr.evaluate("rule == 'scores'", {"rule": "scores"}) is True
    assert expr.evaluate("x + 1 if x != None else None", {"x": None}) is None  # lazy: x + 1 never runs
    assert expr.names("c_min + max(_extra, num_layers)") == {"c_min", "_extra", "num_layers"}


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", "only calls of"),
    ("num_scales.real", "Attribute"),
    ("b'abc'", "only numbers, strings and None"),
    ("[x for x in y]", "ListComp"),
    ("2 **", "not valid"),
])
def test_unsafe_or_malformed_expressions_are_rejected(text, message):
    with pytest.raises(expr.ExprError, match=message):
        expr.evaluate(text, {"y": (1,)})


def test_unknown_name_and_runtime_errors():
    with pytest.raises(expr.ExprError, match="unknown name 'num_scale'"):
        expr.evaluate("num_scale - 1", {"num_scales": 3})
    with pytest.raises(expr.ExprError, match="failed"):
        expr.evaluate("1 // 0", {})
    with pytest.raises(expr.ExprError, match="too large"):
        expr.evaluate("2 ** 1000", {})


def test_yaml_lines_map_keys_and_items(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("a:\n  b: 1\n  c:\n    - x\n    - y\n")
    doc = load_with_lines(p)
    assert doc.data == {"a": {"b": 1, "c": ["x", "y"]}}
    assert doc.line(("a", "b")) == 2 and doc.line(("a", "c", 1)) == 5
    assert doc.line(("a", "missing")) == 1  # falls back to the closest ancestor ("a" is on line 1)
    err = doc.error(("a", "c", 0), "bad item")
    assert str(err) == f"{p}:4: a.c.0: bad item"


def test_yaml_syntax_error_and_duplicate_key_have_line_numbers(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: invalid YAML"):
        load_with_lines(p)
    p.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: a: duplicate key \(first at line 1\)"):
        load_with_lines(p)
