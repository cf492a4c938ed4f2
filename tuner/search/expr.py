"""A tiny, safe arithmetic language for search-space files (``"num_scales - 2"``, ``"c_min + extra"``).

Only numbers, strings, ``None``, names from a given environment, ``+ - * / // % **``, comparisons,
``and/or/not``, conditional expressions, subscripts of tuples (``scale_lengths[-1]``) and the functions
below are allowed; anything else (attributes, lambdas, comprehensions, calls of other names) is rejected
when the file is loaded. Never ``eval``: the file is user input.

Every operation is bounded *before* it is computed, so no expression can exhaust CPU or memory:
an expression has at most :data:`MAX_CHARS` characters, :data:`MAX_NODES` syntax nodes and
:data:`MAX_DEPTH` levels of nesting; integers stay within ``±MAX_INT`` (10**18; a power is refused
when its bit-length estimate says it would not); strings and tuples are at most :data:`MAX_LEN`
long (repetition and concatenation are checked on the resulting length), tuples hold only scalars,
``%`` does no string formatting, ``sum`` adds numbers only and ``round`` takes at most
:data:`MAX_ROUND_DIGITS` digits.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
from typing import Any

MAX_CHARS = 1000  # the shipped expressions are < 50 characters
MAX_NODES = 200  # syntax-tree nodes of one expression
MAX_DEPTH = 50  # nesting of the syntax tree (bounds the evaluator's recursion)
MAX_INT = 10**18  # |integer| of any constant or intermediate result
MAX_EXPONENT = 64  # |exponent| of a power
MAX_LEN = 10_000  # length of any string or tuple
MAX_ROUND_DIGITS = 32  # |ndigits| of round()

FUNCTIONS = {"min": min, "max": max, "int": int, "float": float, "round": round, "abs": abs,
             "ceil": math.ceil, "floor": math.floor, "sum": sum, "len": len}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_SCALARS = (int, float, str, type(None))
_SEQS = (str, tuple, list)  # lists only come from ``fixed:`` values in the environment


class ExprError(ValueError):
    """A malformed or failing expression (the message names the problem)."""


class _Limit(ExprError):
    """A bound of this module was hit (the message names it; :func:`evaluate` adds the expression)."""


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> ast.Expression:
    """Parse and check that only the allowed constructs are used (cached: trees are never mutated)."""
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression {_short(text)} is {len(text)} characters long, over the limit of "
                        f"{MAX_CHARS}; use a shorter expression")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"expression {text!r} is not valid ({exc.msg})") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes; "too complex"
        raise ExprError(f"expression {_short(text)} is not valid ({type(exc).__name__}: {exc})") from None
    count, stack = 0, [(tree, 1)]
    while stack:  # iterative: a deep tree must not overflow the checker either
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            what = (f"more than {MAX_NODES} syntax nodes" if count > MAX_NODES
                    else f"nesting deeper than {MAX_DEPTH}")
            raise ExprError(f"expression {_short(text)} is too complex ({what}); simplify it")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp,
                               ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.IfExp, ast.Call, ast.Subscript,
                               ast.Tuple, ast.List)) \
            or type(node) in _BINOPS or type(node) in _CMPOPS or type(node) in _UNARY
        if not ok:
            raise ExprError(f"expression {text!r} uses {type(node).__name__}, which is not allowed")
        if isinstance(node, ast.Constant) and not (node.value is None
                                                   or isinstance(node.value, (int, float, str))):
            raise ExprError(f"expression {text!r}: only numbers, strings and None are allowed as constants")
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) > MAX_INT:
            raise ExprError(f"expression {_short(text)}: integer constant over the limit of 10**18; "
                            f"use a smaller number")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name)
                                           or node.func.id not in FUNCTIONS or node.keywords):
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
    except _Limit as exc:
        raise ExprError(f"expression {_short(text)}: {exc}") from None
    except ExprError:
        raise
    except (ArithmeticError, TypeError, ValueError, LookupError) as exc:
        raise ExprError(f"expression {_short(text)} failed: {exc}") from None


def _check(value: Any) -> Any:
    """``value`` if it is within the bounds, else :class:`_Limit`."""
    if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        raise _Limit("integer result over the limit of 10**18; keep values smaller")
    if isinstance(value, _SEQS):
        if len(value) > MAX_LEN:
            raise _Limit(f"a result of length {len(value)} is over the limit of {MAX_LEN}; keep it shorter")
        if not isinstance(value, str) and not all(isinstance(v, _SCALARS) for v in value):
            raise _Limit("tuples may hold only numbers, strings and None; use a flat tuple")
    return value


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    """``left op right`` after checking that its cost and size are bounded."""
    if isinstance(op, ast.Mult):
        seq, n = (left, right) if isinstance(left, _SEQS) else (right, left)
        if isinstance(seq, _SEQS) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_LEN:
            raise _Limit(f"repetition of length {len(seq)} by {n} would be longer than the limit of "
                         f"{MAX_LEN}; repeat fewer times")
    elif isinstance(op, ast.Add) and isinstance(left, _SEQS) and isinstance(right, _SEQS):
        if len(left) + len(right) > MAX_LEN:
            raise _Limit(f"concatenation would be {len(left) + len(right)} long, over the limit of "
                         f"{MAX_LEN}; join shorter values")
    elif isinstance(op, ast.Mod) and isinstance(left, str):
        raise _Limit("string formatting with % is not allowed; use % on numbers only")
    elif isinstance(op, ast.Pow):
        if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:  # must not hang the loader
            raise _Limit(f"exponent {right} is too large (at most {MAX_EXPONENT}); use a smaller exponent")
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            # |left| >= 2**(bits-1), so the result is at least 2**((bits-1)*right): refuse it before computing
            if (abs(left).bit_length() - 1) * right >= 60:  # 2**60 > 10**18
                raise _Limit(f"{left} ** {right} is too large (over the limit of 10**18); "
                             f"use a smaller power")
    return _check(_BINOPS[type(op)](left, right))


def _call(name: str, args: list) -> Any:
    if name == "sum":
        if len(args) != 1 or not isinstance(args[0], (tuple, list)) or not all(
                isinstance(v, (int, float)) for v in args[0]):
            raise _Limit("sum() takes one tuple of numbers; write e.g. sum(scale_lengths)")
    elif name == "round" and len(args) > 1 and isinstance(args[1], int) and abs(args[1]) > MAX_ROUND_DIGITS:
        raise _Limit(f"round() to {args[1]} digits is too many (at most {MAX_ROUND_DIGITS}); "
                     f"use fewer digits")
    return _check(FUNCTIONS[name](*args))


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ExprError(f"unknown name {node.id!r} (known: {', '.join(sorted(env))})")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _check(_UNARY[type(node.op)](_eval(node.operand, env)))
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
        return _call(node.func.id, [_eval(a, env) for a in node.args])
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env)[_eval(node.slice, env)]
    if isinstance(node, (ast.Tuple, ast.List)):
        return _check(tuple(_eval(e, env) for e in node.elts))
    raise ExprError(f"{type(node).__name__} is not allowed")  # pragma: no cover - parse() rejects it
