"""``tuner policy check``: compare candidate policy files with committed reference policies.

Matching: a candidate's reference is the reference file for the same model (name and geometry) and
the same search target — the memory target (``provenance.mem_target``, e.g. ``"15%"``; ``"0.15"`` is
the same target) or, for ``--fid-limit`` searches, the quality limit on the same metric.

Memory: the planned fraction of the full cache (the budget table a file promises, checked on load)
may exceed the reference's by at most ``Tolerances.memory`` (absolute). Quality: stored metrics come
from other seeds and sample counts, so both policies are re-evaluated, paired, on one fixed held-out
:class:`~tuner.quality.evaluate.EvalSpec` with the real evaluator, and the candidate may be worse on
the metric the reference was searched for by at most the metric's tolerance (PSNR/SSIM: higher is
better; the FID-type metrics: lower is better). Nothing here imports optuna, ray or mlflow.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tuner.errors import UserError
from tuner.quality.metric_info import METRICS

DEFAULT_METRIC = "fid_vs_full"  # what `tuner search` optimises unless --metric says otherwise


@dataclass(frozen=True)
class Tolerances:
    """How much worse a candidate may be than its reference before the check fails.

    The defaults are about twice the seed-to-seed spread measured on tiny with 64 images (PSNR
    ±0.27 dB, SSIM ±0.018, fid_vs_full ±11%); paired differences on one spec are smaller still.
    """

    memory: float = 0.005  # absolute fraction of the full cache
    psnr: float = 0.5  # dB
    ssim: float = 0.02
    fid_rel: float = 0.15  # FID-type metrics: this fraction of the reference's value ...
    fid_abs: float = 1.0  # ... but never less than this (delta_fid can be near 0)

    def allowed(self, metric: str, reference: float) -> float:
        if metric == "psnr":
            return self.psnr
        if metric == "ssim":
            return self.ssim
        return max(self.fid_abs, self.fid_rel * abs(reference))


@dataclass(frozen=True)
class Entry:
    """A loaded policy file and the search target it was exported for."""

    path: str
    policy: Any
    info: Any  # tuner.policy_file.PolicyFileInfo
    target: tuple  # ("mem", kind, value) or ("limit", metric, value)
    metric: str | None

    @property
    def model(self) -> str:
        return str(self.info.model.get("name"))

    @property
    def schedule(self) -> dict:
        """The schedule flags (``aspect``, ``scales``) of an Infinity file's token maps, so it is
        re-evaluated on the maps it was planned for; ``{}`` for VAR (a fixed schedule)."""
        from tuner.model.config import NAMED_MODELS

        m = self.info.model
        make = NAMED_MODELS.get(self.model)
        if make is None or make().kind != "infinity":
            return {}
        from tuner.model.infinity_schedules import aspect_of_maps

        shapes = m.get("scale_shapes") or [(p, p) for p in m.get("patch_nums") or ()]
        try:
            return {"aspect": aspect_of_maps(shapes), "scales": len(shapes)}
        except ValueError as exc:
            raise UserError(f"{self.path}: {exc}; re-export it with `tuner search`") from None

    @property
    def key(self) -> tuple:
        m = self.info.model
        shapes = tuple(tuple(hw) for hw in m.get("scale_shapes") or ())  # () for square maps
        return (m.get("name"), m.get("depth"), tuple(m.get("patch_nums") or ()), shapes, self.target)

    def describe_target(self) -> str:
        kind, a, b = self.target
        if kind == "limit":
            return f"{a} limit {b:g}"
        return f"{100 * b:g}%" if a == "fraction" else f"{b} B/image"


@dataclass(frozen=True)
class CheckRow:
    candidate: str
    reference: str | None
    target: str
    metric: str
    cand_memory: float
    ref_memory: float | None = None
    values: tuple[tuple[str, float, float], ...] = ()  # (metric, candidate, reference)
    problems: tuple[str, ...] = ()

    @property
    def regressed(self) -> bool:
        return bool(self.problems)

    @property
    def verdict(self) -> str:
        if self.reference is None:
            return "new (no reference)"
        return "REGRESSION: " + "; ".join(self.problems) if self.problems else "ok"


def _target(path: str, prov: dict) -> tuple:
    from tuner.mem_target import parse_mem_target

    if prov.get("mem_target"):
        t = parse_mem_target(str(prov["mem_target"]), flag=f"{path}: provenance.mem_target")
        if t.fraction is not None:
            return ("mem", "fraction", round(t.fraction, 9))
        return ("mem", "bytes", t.bytes_per_image)
    if prov.get("quality_limit") is not None:
        return ("limit", str(prov.get("metric") or DEFAULT_METRIC), float(prov["quality_limit"]))
    raise UserError(f"{path} records no search target (provenance.mem_target); re-export it with "
                    f"`tuner search` from this version so it can be matched to a reference")


def load_entry(path: str | Path, model_cfg: Any = None) -> Entry:
    """Load and validate one policy file (one-line ``UserError`` if it is unusable)."""
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(path, model_cfg)
    prov = info.provenance or {}
    metric = prov.get("metric")
    if metric is not None and metric not in METRICS:
        raise UserError(f"{path}: unknown search metric {metric!r} in provenance; pass --metric "
                        f"({', '.join(METRICS)})")
    return Entry(str(path), policy, info, _target(str(path), prov), metric)


def load_references(paths: list[str], model_cfg: Any = None) -> dict[tuple, Entry]:
    """Reference files by match key; a directory contributes its ``*.json`` files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"reference {p} does not exist; pass --reference with the policies/ directory "
                            f"or files")
    if not files:
        raise UserError(f"no reference policy files (*.json) in {', '.join(paths)}; "
                        f"pass --reference policies/")
    refs: dict[tuple, Entry] = {}
    for f in files:
        e = load_entry(f, model_cfg)
        if e.key in refs:
            raise UserError(f"references {refs[e.key].path} and {f} are for the same model and target; "
                            f"keep one")
        refs[e.key] = e
    return refs


def match(candidates: list[Entry], refs: dict[tuple, Entry],
          allow_new: bool) -> list[tuple[Entry, Entry | None]]:
    """Pair every candidate with its reference; a candidate without one is an error unless ``allow_new``."""
    pairs = []
    for c in candidates:
        r = refs.get(c.key)
        if r is None and not allow_new:
            raise UserError(f"no reference policy for {c.path} ({c.model}, target {c.describe_target()}); "
                            f"add one to the reference directory after review, or pass --allow-new")
        if r is not None and r.info.checkpoint_sha256 != c.info.checkpoint_sha256:
            raise UserError(f"{c.path} and its reference {r.path} were tuned on different checkpoints; "
                            f"regenerate the references for the current weights")
        pairs.append((c, r))
    return pairs


def _with_file_calibration(evaluator: Any, entry: Entry) -> Any:
    """The evaluator planning with the calibration embedded in the file (what its budgets assume)."""
    from tuner.policies.base import PolicySpec

    geometry = evaluator.loaded.config.geometry
    spec = PolicySpec(geometry, evaluator.loaded.config.name, entry.info.calibration)
    return dataclasses.replace(evaluator, spec_for=lambda policy: spec)


def compare(pairs: list[tuple[Entry, Entry | None]], evaluator_for: Callable[[Entry], Any], samples: int,
            seed: int, batch_size: int, tol: Tolerances, metric: str | None = None,
            guards: tuple[str, ...] = ("psnr",)) -> list[CheckRow]:
    """Re-evaluate each pair on one paired spec (identical policies once) and judge the candidate.

    ``evaluator_for(entry)``: the evaluator of the entry's model at the entry's schedule
    (:attr:`Entry.schedule`; a pair shares it, since the match key holds the maps).

    Quality is judged on the search metric and on the ``guards`` (PSNR by default: on tiny the
    feature-based fid_vs_full barely separates a one-token cache from a searched 10% policy, while
    paired PSNR drops by 1.7 dB).
    """
    from tuner.quality.evaluate import EvalSpec

    cache: dict[str, dict] = {}

    def measure(entry: Entry, spec: Any) -> dict:
        key = json.dumps([entry.model, entry.policy.family, entry.policy.params(), entry.info.plan.budgets],
                         sort_keys=True, default=str)
        if key not in cache:
            ev = evaluator_for(entry)
            sha = ev.loaded.checkpoint_sha256
            if entry.info.checkpoint_sha256 and sha and entry.info.checkpoint_sha256 != sha:
                raise UserError(f"{entry.path} was tuned on checkpoint {entry.info.checkpoint_sha256[:12]}…, "
                                f"the loaded {entry.model} weights are {sha[:12]}…; "
                                f"pass the weights it was made for")
            from tuner.policy_file import load_policy_file

            load_policy_file(entry.path, ev.loaded.config)  # the evaluator plans what the file holds
            cache[key] = _with_file_calibration(ev, entry).evaluate(entry.policy.family,
                                                                    entry.policy.params(), spec)
        return cache[key]

    rows = []
    for cand, ref in pairs:
        name = metric or (ref.metric if ref is not None else None) or cand.metric or DEFAULT_METRIC
        cand_mem = float(cand.info.memory["fraction"])
        if ref is None:
            rows.append(CheckRow(cand.path, None, cand.describe_target(), name, cand_mem))
            continue
        ev = evaluator_for(cand)
        spec = EvalSpec.balanced(ev.loaded.num_conditions, samples, seed, batch_size=batch_size,
                                **ev.loaded.config.sampling.as_kwargs())
        mc, mr = measure(cand, spec), measure(ref, spec)
        names = [name, *(g for g in guards if g != name)]
        missing = [n for n in names if n not in mc or n not in mr]
        if missing:
            raise UserError(f"metric {missing[0]} is not measured for {cand.model} here "
                            f"(got {', '.join(sorted(mc))}); pass --metric psnr or ssim and "
                            f"--guard-metrics psnr")
        # the planner's figures for the files' own budget tables (loading proved them equal to the plan)
        cand_mem, ref_mem = float(mc["memory_fraction"]), float(mr["memory_fraction"])
        problems = []
        if cand_mem > ref_mem + tol.memory:
            problems.append(f"memory {100 * cand_mem:.2f}% > {100 * ref_mem:.2f}% + {100 * tol.memory:g} pts")
        for n in names:
            vc, vr, allowed = mc[n], mr[n], tol.allowed(n, mr[n])
            # inf == inf: PSNR of full
            worse = 0.0 if vc == vr else vr - vc if METRICS[n].higher_is_better else vc - vr
            if not worse <= allowed:  # also catches NaN
                problems.append(f"{n} {vc:.4g} vs {vr:.4g} (worse by {worse:.3g} > {allowed:.3g})")
        rows.append(CheckRow(cand.path, ref.path, cand.describe_target(), name, cand_mem, ref_mem,
                             tuple((n, mc[n], mr[n]) for n in names), tuple(problems)))
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    """Plain-text table: candidate, reference, memory, metric, verdict."""
    head = ("candidate", "reference", "target", "memory cand/ref", "metric cand/ref", "verdict")
    body = []
    for r in rows:
        mem = f"{100 * r.cand_memory:.2f}%" + (f" / {100 * r.ref_memory:.2f}%" if r.ref_memory is not None
                                               else "")
        met = ", ".join(f"{n} {c:.4g} / {v:.4g}" for n, c, v in r.values) or f"{r.metric} -"
        body.append((r.candidate, r.reference or "-", r.target, mem, met, r.verdict))
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]

    def fmt(row: tuple) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths) + ("-" * 7,)), *map(fmt, body)])
