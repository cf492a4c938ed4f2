"""Reading a policy file as untrusted input: bounded size and nesting, then a type check of every field.

:func:`read_policy_json` refuses a file unread when it is over :data:`MAX_FILE_BYTES` and after parsing
when it is nested deeper than :data:`MAX_DEPTH`; :func:`check_policy_schema` type-checks every field the
loader (:mod:`tuner.policy_file`) and its callers read, before any of it is used. Each refusal is one
line naming the file and the field.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tuner.errors import UserError

KIND = "varkv-tuner policy"
MAX_FILE_BYTES = 4 << 20  # 4 MiB; a d36 policy with its calibration is ~110 KB
MAX_DEPTH = 16  # JSON nesting; policy files need 4 (calibration density tables)

# JSON types of the fields (``?``: may be absent). Unknown fields are allowed (newer writers).
_TOP = {"kind": "string?", "model": "object", "policy": "object", "budgets": "array", "full": "boolean?",
        "kv_formats": "array?", "head_budgets": "array?",
        "memory": "object", "calibration": "object|null?", "metrics": "object|null?",
        "eval_spec": "object|null?", "provenance": "object|null?"}
_SECTIONS = {
    "model": {"name": "string", "depth": "integer", "patch_nums": "array", "num_heads": "integer",
              "head_dim": "integer", "checkpoint_sha256": "string|null?",
              "scale_shapes": "array?"},  # [h, w] per scale, only for non-square maps
    "policy": {"family": "string", "params": "object|null?"},
    "memory": {"dtype": "string?", "cfg": "boolean?", "kv_bytes_per_image": "number", "fraction": "number",
               "full_kv_bytes_per_image": "number?", "capacities": "array?", "workspace_tokens": "integer?"},
    "provenance": {"mem_target": "string|number|null?", "quality_limit": "number|null?",
                   "metric": "string|null?"},  # the fields tuner policy check reads
}
_ARRAYS_OF_INTEGERS = (("model", "patch_nums"), ("memory", "capacities"))


def read_policy_json(path: Path, where: str, redo: str) -> Any:
    """The parsed file, refused before ``json.loads`` when too large and after it when nested too deep."""
    try:
        size = path.stat().st_size
        if size <= MAX_FILE_BYTES:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)  # a file growing meanwhile is still cut off here
            size = len(raw)
    except OSError as exc:
        raise UserError(f"cannot read policy file {where}: {exc.strerror or exc}; check the path") from None
    if size > MAX_FILE_BYTES:
        raise UserError(f"{where} is {size} bytes, over the {MAX_FILE_BYTES >> 20} MiB limit for policy "
                        f"files (they are ~100 KB at most); pass a policy file or {redo}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); {redo}") from None
    except RecursionError:
        raise UserError(f"{where} is nested deeper than {MAX_DEPTH} levels (policy files need 4); "
                        f"{redo}") from None
    except ValueError as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); {redo}") from None
    stack = [(doc, 0)]
    while stack:  # iterative: the check itself must not recurse
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UserError(f"{where} is nested deeper than {MAX_DEPTH} levels (policy files need 4); {redo}")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
    return doc


_JSON_TYPES = {"object": dict, "array": list, "string": str, "null": type(None)}
_ARTICLE = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
            "number": "a number", "finite number": "a finite number", "boolean": "a boolean", "null": "null"}


def _named(kind: str) -> str:
    return _ARTICLE.get(kind, kind)


def _json_type(value: Any) -> str:
    """The JSON type of ``value`` with its article, for messages (``an array``, ``NaN``)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else {"nan": "NaN"}.get(repr(value), repr(value))
    kind = next((name for name, cls in _JSON_TYPES.items() if isinstance(value, cls)), type(value).__name__)
    return _named(kind)


def _is(value: Any, kind: str) -> bool:
    if kind == "number":  # finite: NaN/Infinity (which json.loads accepts) are never a valid figure
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[kind])


def _check_fields(where: str, redo: str, obj: dict, spec: dict[str, str], prefix: str = "") -> None:
    for key, kinds in spec.items():
        optional = kinds.endswith("?")
        if key not in obj:
            if optional:
                continue
            raise UserError(f"{where}: field {prefix + key!r} is missing; {redo}")
        allowed = kinds.rstrip("?").split("|")
        value = obj[key]
        if not any(_is(value, k) for k in allowed):
            wanted = " or ".join(_named("finite number" if k == "number" else k) for k in allowed)
            raise UserError(f"{where}: field {prefix + key!r} must be {wanted}, not {_json_type(value)}; "
                            f"{redo}")


def check_policy_schema(where: str, doc: dict, redo: str) -> None:
    """Type-check every field the loader and its callers read, before any of it is used."""
    from tuner.memory import DTYPE_BYTES

    _check_fields(where, redo, doc, _TOP)
    if doc.get("kind", KIND) != KIND:
        raise UserError(f"{where} is not a varkv-tuner policy file (kind {doc['kind'][:80]!r}, expected "
                        f"{KIND!r}); {redo}")
    for section, spec in _SECTIONS.items():
        if isinstance(doc.get(section), dict):
            _check_fields(where, redo, doc[section], spec, prefix=f"{section}.")
    dtype = doc["memory"].get("dtype", "fp16")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"{where}: field 'memory.dtype' is {dtype[:40]!r}; it must be one of "
                        f"{', '.join(DTYPE_BYTES)}; {redo}")
    for section, key in _ARRAYS_OF_INTEGERS:
        values = doc[section].get(key) if isinstance(doc.get(section), dict) else None
        for i, v in enumerate(values or ()):
            if not _is(v, "integer"):
                raise UserError(f"{where}: field '{section}.{key}[{i}]' must be an integer, not "
                                f"{_json_type(v)}; {redo}")
    for i, row in enumerate(doc["budgets"]):
        if not isinstance(row, list):
            raise UserError(f"{where}: field 'budgets[{i}]' must be an array (one row per layer), not "
                            f"{_json_type(row)}; {redo}")
        for j, b in enumerate(row):
            if not _is(b, "integer"):
                raise UserError(f"{where}: field 'budgets[{i}][{j}]' must be an integer, not "
                                f"{_json_type(b)}; {redo}")
    for i, f in enumerate(doc.get("kv_formats") or ()):
        if not _is(f, "string"):
            raise UserError(f"{where}: field 'kv_formats[{i}]' must be a string (a storage format per "
                            f"layer), not {_json_type(f)}; {redo}")
    if doc.get("kv_formats") and len(doc["kv_formats"]) != len(doc["budgets"]):
        raise UserError(f"{where}: field 'kv_formats' has {len(doc['kv_formats'])} entries, the budget table "
                        f"{len(doc['budgets'])} layers; {redo}")
    _check_head_budgets(where, redo, doc.get("head_budgets") or ())
    for i, hw in enumerate(doc["model"].get("scale_shapes") or ()):
        if not (isinstance(hw, list) and len(hw) == 2 and all(_is(v, "integer") for v in hw)):
            raise UserError(f"{where}: field 'model.scale_shapes[{i}]' must be [height, width] integers, not "
                            f"{_json_type(hw)}; {redo}")
    for key, value in (doc.get("metrics") or {}).items():
        if not any(_is(value, k) for k in ("number", "string", "null")):
            raise UserError(f"{where}: field 'metrics.{key}' must be a number, a string or null, not "
                            f"{_json_type(value)}; {redo}")


def _check_head_budgets(where: str, redo: str, table: Any) -> None:
    """``head_budgets[layer][scale][head]``: arrays of arrays of integers (shapes: the plan's check)."""
    for i, layer in enumerate(table):
        if not isinstance(layer, list) or not all(isinstance(per_head, list) for per_head in layer):
            raise UserError(f"{where}: field 'head_budgets[{i}]' must be an array of per-scale arrays (one "
                            f"budget per head); {redo}")
        for j, per_head in enumerate(layer):
            for h, b in enumerate(per_head):
                if not _is(b, "integer"):
                    raise UserError(f"{where}: field 'head_budgets[{i}][{j}][{h}]' must be an integer, not "
                                    f"{_json_type(b)}; {redo}")
