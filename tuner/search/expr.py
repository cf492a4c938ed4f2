"""A tiny, safe arithmetic language for search-space files (``"num_scales - 2"``, ``"c_min + extra"``).

Only numbers, strings, ``None``, names from a given environment, ``+ - * / // % **``, comparisons, ``and/or/not``,
conditional expressions, subscripts of tuples (``scale_lengths[-1]``) and the functions below are
allowed; anything else (attributes, lambdas, comprehensions, calls of other names) is rejected when
the file is loaded. Never ``eval``: the file is user input.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
from typing import Any

FUNCTIONS = {"min": min, "max": max, "int": int, "float": float, "round": round, "abs": abs,
             "ceil": math.ceil, "floor": math.floor, "sum": sum, "len": len}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


class ExprError(ValueError):
    """A malformed or failing expression (the message names the problem)."""


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> ast.Expression:
    """Parse and check that only the allowed constructs are used (cached: trees are never mutated)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"expression {text!r} is not valid ({exc.msg})") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp,
                               ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.IfExp, ast.Call, ast.Subscript,
                               ast.Tuple, ast.List)) \
            or type(node) in _BINOPS or type(node) in _CMPOPS or type(node) in _UNARY
        if not ok:
            raise ExprError(f"expression {text!r} uses {type(node).__name__}, which is not allowed")
        if isinstance(node, ast.Constant) and not (node.value is None or isinstance(node.value, (int, float, str))):
            raise ExprError(f"expression {text!r}: only numbers, strings and None are allowed as constants")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS
                                           or node.keywords):
            raise ExprError(f"expression {text!r}: only calls of {', '.join(FUNCTIONS)} are allowed")
    return tree


def names(text: str) -> set[str]:
    """Variable names an expression reads (function names excluded)."""
    tree = parse(text)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called


def evaluate(text: str, env: dict[str, Any]) -> Any:
    """Value of ``text`` with the variables in ``env``; :class:`ExprError` on unknown names or errors."""
    tree = parse(text)
    try:
        return _eval(tree.body, env)
    except ExprError:
        raise
    except (ArithmeticError, TypeError, ValueError, IndexError) as exc:
        raise ExprError(f"expression {text!r} failed: {exc}") from None


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ExprError(f"unknown name {node.id!r} (known: {', '.join(sorted(env))})")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # a user file must not hang the loader
            raise ExprError(f"exponent {right} is too large")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env) if _eval(node.test, env) else _eval(node.orelse, env)
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](*[_eval(a, env) for a in node.args])
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env)[_eval(node.slice, env)]
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_eval(e, env) for e in node.elts)
    raise ExprError(f"{type(node).__name__} is not allowed")  # pragma: no cover - parse() rejects it
