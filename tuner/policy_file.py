"""Deployable policy files (docs/design.md, Tracking and export): JSON with a schema version, checked
strictly on load.

Layout (``schema_version`` 1)::

    {"schema_version": 1, "kind": "varkv-tuner policy",
     "model": {"name", "depth", "patch_nums", "num_heads", "head_dim", "checkpoint_sha256",
               "scale_shapes"},   # [h, w] per scale, only for non-square maps (absent: square)
     "policy": {"family", "params"},
     "budgets": [[...per scale...] per layer], "full": false,
     "kv_formats": ["compute" | "int8" | "int4", ... per layer],   # absent in older files: all compute
     "memory": {"dtype", "cfg", "kv_bytes_per_image", "full_kv_bytes_per_image", "fraction",
                "capacities", "workspace_tokens"},
     "calibration": {...} | null,     # the statistics the family planned with (needed to re-plan)
     "metrics": {...} | null, "eval_spec": {...} | null,
     "provenance": {"study", "trial", "mlflow_run_id", "tuner_version", "git_sha", "created", ...}}

Loading re-plans the policy from its family and params (with the embedded calibration) and refuses
the file unless the result equals the stored budget table and storage formats — the table is what
memory was promised on, so a file can never silently run with other budgets. A file written before
quantized storage existed has no ``kv_formats`` and loads as the 16-bit (compute dtype) cache it was;
``model.scale_shapes`` only for non-square maps (``patch_nums`` the heights): without it, square.

The file is user input: :mod:`tuner.policy_schema` bounds its size and nesting and type-checks every
field above before any of it is used, each refusal one line naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.geometry import format_shapes
from tuner.policies.base import CacheGeometry, CachePlan, KVPolicy, PolicySpec
from tuner.policy_model import check_model, file_geometry, model_identity  # noqa: F401 - re-exported
from tuner.policy_schema import KIND, check_policy_schema, read_policy_json
from tuner.provenance import git_sha

SCHEMA_VERSION = 1
_REQUIRED = ("model", "policy", "budgets", "memory")
@dataclass(frozen=True)
class PolicyFileInfo:
    """Everything in a loaded policy file besides the policy object."""

    path: str
    schema_version: int
    model: dict
    plan: CachePlan
    memory: dict
    calibration: Any = None  # tuner.calibration.Calibration or None
    metrics: dict | None = None
    eval_spec: dict | None = None
    provenance: dict | None = None

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.model.get("checkpoint_sha256")


def _plain(obj: Any) -> Any:
    if obj is None or isinstance(obj, dict):
        return obj
    if dataclasses.is_dataclass(obj):
        return json.loads(json.dumps(dataclasses.asdict(obj)))
    return dict(obj)


def write_policy_file(path: str | Path, policy: KVPolicy, model_cfg: Any, *,
                      checkpoint_sha256: str | None = None, spec: PolicySpec | None = None,
                      calibration: Any = None, dtype: str = "fp16", metrics: dict | None = None,
                      eval_spec: Any = None, provenance: dict | None = None) -> Path:
    """Plan ``policy`` for ``model_cfg`` and write the file; returns its path.

    ``calibration`` (or ``spec.calibration``) is embedded when the family needs it, so the file can
    be re-planned and checked anywhere. ``provenance`` entries are merged over the automatic ones
    (tuner version, git sha, creation time).
    """
    from tuner import __version__
    from tuner.memory import memory_report

    geometry = model_cfg.geometry
    if calibration is None and spec is not None:
        calibration = spec.calibration
    spec = PolicySpec(geometry, model_cfg.name, calibration)
    report = memory_report(policy, geometry, dtype=dtype, cfg=True, spec=spec)
    prov = {"study": None, "trial": None, "mlflow_run_id": None, "tuner_version": __version__,
            "git_sha": git_sha(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(provenance or {})
    doc = {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "model": model_identity(model_cfg, checkpoint_sha256),
        "policy": {"family": policy.family, "params": policy.params()},
        "budgets": [list(row) for row in report.plan.budgets], "full": report.plan.full,
        "kv_formats": list(report.plan.layer_formats(geometry.num_layers)),
        **({"head_budgets": [[list(per_head) for per_head in layer] for layer in report.plan.head_budgets]}
           if report.plan.per_head else {}),  # absent for per-layer plans: such files read as before
        "memory": {"dtype": report.dtype, "cfg": True, "kv_bytes_per_image": report.kv_bytes_per_image,
                   "full_kv_bytes_per_image": report.full_kv_bytes_per_image, "fraction": report.fraction,
                   "capacities": list(report.capacities), "workspace_tokens": report.workspace_tokens},
        "calibration": _calibration_section(policy, calibration),
        "metrics": _finite_metrics(metrics) if metrics else None,
        "eval_spec": _plain(eval_spec),
        "provenance": json.loads(json.dumps(prov, default=str)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _calibration_section(policy: KVPolicy, calibration: Any) -> dict | None:
    """What the file embeds: the calibration a calibrated family plans from, without the per-head
    summary unless the family reads it (a per-layer family's file stays as small as it was)."""
    if calibration is None or not policy.needs_calibration:
        return None
    if not policy.needs_head_calibration:
        calibration = dataclasses.replace(calibration, heads=None)
    return calibration.to_dict()


def load_policy_file(path: str | Path, model_cfg: Any = None, *,
                     checkpoint_sha256: str | None = None) -> tuple[KVPolicy, PolicyFileInfo]:
    """Read and check a policy file; ``(policy, info)`` or a one-line ``UserError`` naming the fix.

    With ``model_cfg`` the file must be for that model (name, depth, patch_nums, heads); with both
    hashes known (``checkpoint_sha256`` and the file's) they must match.
    """
    where = str(path)
    redo = "re-export it with `tuner search` (or write it with tuner.policy_file.write_policy_file)"
    doc = _read_document(Path(path), where, redo)
    model = doc["model"]
    geometry, family, params = _model_and_policy_section(where, doc, redo)
    if model_cfg is not None:
        check_model(where, model, geometry, model_cfg)
    file_sha = model.get("checkpoint_sha256")
    if file_sha and checkpoint_sha256 and file_sha != checkpoint_sha256:
        raise UserError(f"{where} was tuned on checkpoint {file_sha[:12]}…, the loaded weights are "
                        f"{checkpoint_sha256[:12]}…; load the weights it was made for or tune a policy "
                        "for these")
    policy = _make_policy(where, family, params, redo)
    calibration = _embedded_calibration(where, doc, geometry, redo)
    plan = _stored_plan(where, doc, geometry, redo)
    spec = PolicySpec(geometry, str(model.get("name", "")), calibration)
    _check_replanned(where, doc, family, policy, spec, plan, redo)
    info = PolicyFileInfo(where, SCHEMA_VERSION, dict(model), plan, dict(doc["memory"]), calibration,
                          doc.get("metrics"), doc.get("eval_spec"), doc.get("provenance"))
    return policy, info


def _read_document(path: Path, where: str, redo: str) -> dict:
    """The file's JSON, checked for kind, schema version, required sections and field types."""
    doc = read_policy_json(path, where, redo)
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise UserError(f"{where} is not a varkv-tuner policy file (no schema_version); {redo}")
    # true/1.0 are not 1
    if type(doc["schema_version"]) is not int or doc["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{where} has schema_version {doc['schema_version']!r}, this tuner reads "
                        f"{SCHEMA_VERSION}; use a matching varkv-tuner version or {redo}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise UserError(f"{where} is incomplete (missing: {', '.join(missing)}); {redo}")
    check_policy_schema(where, doc, redo)
    return doc


def _model_and_policy_section(where: str, doc: dict, redo: str) -> tuple[CacheGeometry, str, dict]:
    """``(geometry, family, params)`` from the file's ``model`` and ``policy`` sections."""
    model, pol = doc["model"], doc["policy"]
    try:
        geometry = file_geometry(model)
        family, params = str(pol["family"]), dict(pol.get("params") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: malformed model or policy section ({exc!r}); {redo}") from None
    return geometry, family, params


def _make_policy(where: str, family: str, params: dict, redo: str) -> KVPolicy:
    """The policy object of a known ``family`` with the file's ``params``."""
    from tuner.policies.registry import family_names, make_policy

    if family not in family_names():
        raise UserError(f"{where}: unknown policy family {family!r} (known: {', '.join(family_names())}); "
                        f"upgrade varkv-tuner or {redo}")
    try:
        return make_policy(family, params)
    except ValueError as exc:
        raise UserError(f"{where}: bad {family} parameters: {exc}; fix them or {redo}") from None


def _embedded_calibration(where: str, doc: dict, geometry: CacheGeometry, redo: str) -> Any:
    """The embedded calibration (checked against ``geometry``), or ``None`` when the file has none."""
    from tuner.calibration import Calibration

    if doc.get("calibration") is None:
        return None
    try:
        calibration = Calibration.from_dict(doc["calibration"])
        calibration.check_geometry(geometry)
    except ValueError as exc:
        raise UserError(f"{where}: embedded calibration is unusable ({exc}); {redo}") from None
    return calibration


def _stored_plan(where: str, doc: dict, geometry: CacheGeometry, redo: str) -> CachePlan:
    """The file's budget table as a :class:`CachePlan`, validated against ``geometry``."""
    from varkv_kernels.formats import KV_FORMATS

    formats = tuple(doc.get("kv_formats") or ())
    unknown = sorted({f for f in formats if f not in KV_FORMATS})
    if unknown:
        raise UserError(f"{where}: field 'kv_formats' names unknown KV storage formats {', '.join(unknown)} "
                        f"(this tuner knows {', '.join(KV_FORMATS)}); upgrade varkv-tuner or {redo}")
    if set(formats) == {"compute"}:
        formats = ()
    try:
        heads = tuple(tuple(tuple(_int(b) for b in per_head) for per_head in layer)
                      for layer in doc.get("head_budgets") or ())
        plan = CachePlan(tuple(tuple(int(b) for b in row) for row in doc["budgets"]),
                         bool(doc.get("full", False)), formats, heads)
        plan.validate(geometry)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: budget table does not fit the model ({exc}); {redo}") from None
    return plan


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"head budgets must be integers, got {value!r}")
    return value


def _check_replanned(where: str, doc: dict, family: str, policy: KVPolicy, spec: PolicySpec, plan: CachePlan,
                     redo: str) -> None:
    """Re-plan ``policy`` against ``spec``: budget table and memory figures must equal the stored ones."""
    from tuner.memory import memory_report

    try:
        report = memory_report(policy, spec.geometry, dtype=doc["memory"].get("dtype", "fp16"), spec=spec)
    except ValueError as exc:
        raise UserError(f"{where}: the {family} policy cannot be planned ({exc}); {redo}") from None
    if report.plan.formats != plan.formats:
        raise UserError(f"{where}: the stored kv_formats differ from what the {family} parameters plan "
                        f"(kv_format {policy.kv_format!r}); {redo}")
    if report.plan != plan:
        raise UserError(f"{where}: the budget table differs from what the {family} parameters plan (edited "
                        f"or made by another tuner version); {redo}")
    stored = doc["memory"]["kv_bytes_per_image"]
    if stored != report.kv_bytes_per_image:
        raise UserError(f"{where}: memory figure {stored} B/image does not match the plan "
                        f"({report.kv_bytes_per_image} B); {redo}")
    if not math.isclose(doc["memory"]["fraction"], report.fraction, rel_tol=1e-9, abs_tol=1e-12):
        raise UserError(f"{where}: memory fraction {doc['memory']['fraction']} does not match the plan "
                        f"({report.fraction}); {redo}")


def describe_policy_file(policy: KVPolicy, info: PolicyFileInfo) -> str:
    """Human summary for ``tuner policy show``."""
    from tuner.memory import format_summary

    m, mem, prov = info.model, info.memory, info.provenance or {}
    lines = [f"policy file {info.path} (schema {info.schema_version})",
             f"model: {m.get('name')} depth {m.get('depth')} patch_nums {m.get('patch_nums')} "
             + (f"scales {format_shapes(m['scale_shapes'])} " if m.get("scale_shapes") else "") +
             f"checkpoint {m.get('checkpoint_sha256') or 'none (random weights)'}",
             f"policy: {policy.family} {json.dumps(policy.params())}",
             f"storage: {format_summary(info.plan.formats)}"
             + ("" if any(f != "compute" for f in info.plan.formats) else " (16-bit in deployment)"),
             f"memory: {100 * float(mem.get('fraction', 0)):.2f}% of the full 16-bit cache, "
             f"{mem.get('kv_bytes_per_image')} B per image ({mem.get('dtype')}, CFG)"]
    if info.plan.per_head:  # the packed per-head layout: what each head's buffer holds
        heads = len(info.plan.head_budgets[0][0])
        lines.append("per-head capacities (tokens; each layer stores their sum):")
        lines += [f"  layer {layer}: {list(info.plan.head_capacities(layer, heads))}"
                  for layer in range(len(info.plan.budgets))]
    if info.metrics:
        lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                             for k, v in info.metrics.items()))
    if prov:
        lines.append("provenance: " + ", ".join(f"{k} {v}" for k, v in prov.items() if v is not None))
    return "\n".join(lines)


def _finite_metrics(metrics: dict) -> dict:
    """Metrics as JSON can hold them: a non-finite number (PSNR of images equal to the full cache's is
    +inf) becomes the string ``"inf"`` / ``"-inf"`` / ``"nan"``, which the schema accepts and
    ``tuner policy show`` prints as it is."""
    import math

    return {k: (repr(float(v)) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()}

