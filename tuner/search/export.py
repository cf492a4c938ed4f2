"""The end of a search: reports, re-evaluation of the best candidates on held-out seeds, export.

1. Pareto CSV + PNG from the screening trials (always, also after Ctrl-C).
2. The best ``--final-top-k`` feasible candidates, the full cache and every paper preset are evaluated
   on the final spec (``--final-samples`` images, held-out seeds; cached like every evaluation).
3. The winner among the candidates and the presets that fit the memory target (feasible on the
   final metrics, best objective) is written as a policy file
   (``tuner.policy_file.write_policy_file``), recorded in ``tuner_exported_policies`` and logged to
   MLflow with the reports; a comparison table is printed.
4. Same-seed image grids of the winner, the front and the presets (:mod:`tuner.search.grids`,
   ``--grids``; on by default with MLflow tracking): a failure there only warns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.search import report
from tuner.search.command_line import resume_command
from tuner.search import trials as T
from tuner.search.objective import Objective
from tuner.search.planner import Planned

FINAL_TIMEOUT_FACTOR = 4.0  # the final phase may take this many per-trial timeouts per item at most


def evaluate_items(rt: Any, items: list[tuple[str, str, dict]], spec: dict) -> dict[str, dict]:
    """Metrics (or ``{"error": ...}``) per item name on ``spec``, plan memory merged, through the
    evaluation service (cache first; items that compile to one plan are evaluated once)."""
    results: dict[str, dict] = {}
    pending = 0
    for name, family, params in items:
        try:
            planned = rt.planner.plan(family, params)
        except ValueError as exc:
            results[name] = {"error": str(exc)}
            continue
        metrics = rt.evals.request(planned, spec, name)
        if metrics is not None:
            results[name] = metrics
        else:
            pending += 1
    deadline = time.monotonic() + FINAL_TIMEOUT_FACTOR * rt.cfg.trial_timeout_s * max(1, pending)
    while rt.evals.waiting and time.monotonic() < deadline:
        for done in rt.evals.poll(0.25):
            outcome = {"error": done.error} if done.error is not None else done.metrics
            results.update({name: dict(outcome) for name in done.waiters})
    for name in rt.evals.cancel_all():
        results[name] = {"error": "final evaluation did not finish in time"}
    return results


@dataclass(frozen=True)
class Candidate:
    """A policy in the final round: one of the best trials, or a paper preset/baseline."""

    label: str  # key of its final metrics ("trial 12", "preset ams")
    planned: Planned
    trial: int | None = None
    preset: str | None = None

    @property
    def family(self) -> str:
        return self.planned.family

    @property
    def title(self) -> str:
        return f"trial {self.trial}" if self.trial is not None else f"preset {self.preset}"


def final_candidates(rt: Any, best: list[T.TrialRecord]) -> list[Candidate]:
    """The best screened trials plus every preset whose plan meets the memory target.

    Presets compete on the same held-out samples, so the exported policy is never worse there than
    a preset that fits the target (the search starts from the state of the art and must beat it).
    """
    out = [Candidate(f"trial {r.number}", rt.planner.plan(r.family, r.params), trial=r.number,
                     preset=r.preset)
           for r in best]
    for p in rt.presets:
        try:
            planned = rt.planner.plan(p.family, p.params)
        except ValueError:
            continue
        if planned.fits:
            out.append(Candidate(f"preset {p.name}", planned, preset=p.name))
    return out


def pick_winner(candidates: list[Candidate], final: dict[str, dict], objective: Objective):
    """Best candidate on the final metrics: feasible first, then objective (ties: the earlier one,
    so a search trial wins over a preset with the same numbers); (candidate, metrics, feasible)."""
    scored = []
    for rank, cand in enumerate(candidates):
        m = final.get(cand.label, {})
        if "error" in m:
            continue
        try:
            values = objective.values(m)
            violation = sum(max(0.0, v) for v in objective.constraints(m, cand.planned.violation).values())
        except (KeyError, ValueError):
            continue
        order = (values[1], values[0]) if objective.multi else (values[0],)
        scored.append((violation > 0, violation if violation > 0 else 0.0, order, rank, cand, m))
    if not scored:
        return None
    scored.sort(key=lambda s: s[:4])
    infeasible, _, _, _, cand, m = scored[0]
    return cand, m, not infeasible


def finish_search(rt: Any, driver: Any, result: Any, requeued: list[int]) -> None:
    cfg, console = rt.cfg, rt.console
    objective = rt.objective
    out = cfg.out_dir
    records = driver.records
    csv_path = report.write_pareto_csv(records, objective, out / "pareto.csv")
    png_path = report.write_pareto_png(records, objective, out / "pareto.png", title=cfg.study_name)
    for path in (csv_path, png_path):
        rt.tracker.log_artifact(path, "pareto")
    if result.interrupted:
        console.print(f"interrupted: {len(requeued)} running trial(s) marked FAIL and re-queued; "
                      f"{driver.finished()} finished trials are saved in {cfg.storage}", highlight=False)
        console.print(f"resume with: {resume_command(cfg)}", highlight=False)
        return
    console.print(f"search stopped: {result.stop_reason}", highlight=False)
    best = T.best_records(records, cfg.final_top_k, objective.multi)
    if not best:
        console.print(f"no feasible policy found ({objective.describe()}); loosen the target or raise "
                      f"--trials. Pareto data: {csv_path}", highlight=False)
        return
    candidates = final_candidates(rt, best)
    items = [(c.label, c.planned.family, c.planned.params) for c in candidates if c.trial is not None]
    items.append(("full cache", "full", {}))
    items += [(f"preset {p.name}", p.family, p.params) for p in rt.presets]
    console.print(f"re-evaluating {len(best)} candidate(s), the full cache and {len(rt.presets)} preset(s) "
                  f"on {cfg.final_samples} held-out samples", highlight=False)
    final = evaluate_items(rt, items, rt.final_spec)
    picked = pick_winner(candidates, final, objective)
    if picked is None:
        console.print("every final re-evaluation failed; nothing exported "
                      f"({'; '.join(str(m.get('error')) for m in final.values() if 'error' in m)[:300]})",
                      highlight=False)
        return
    winner, metrics, feasible = picked
    if not feasible:
        console.print("warning: no candidate meets the constraints on the held-out samples; exporting the "
                      "closest one", highlight=False)
    if winner.trial is None:
        console.print(f"note: the preset {winner.preset} beat every searched policy on the held-out samples; "
                      f"exporting it (more --trials or --samples may find better)", highlight=False)
    result.policy_path = write_winner(rt, winner, metrics)
    entries = [("full cache", "full", final.get("full cache", {}))]
    entries += [(p.name, p.family, final.get(f"preset {p.name}", {})) for p in rt.presets]
    entries.append((f"winner ({winner.title})", winner.family, metrics))
    result.comparison = report.comparison_rows(entries)
    cmp_csv, cmp_md = report.write_comparison(result.comparison, out)
    for path in (cmp_csv, cmp_md):
        rt.tracker.log_artifact(path, "summary")
    rt.tracker.log_metrics({f"winner.{k}": v for k, v in metrics.items()})
    console.print(report.comparison_table(result.comparison, title=f"{cfg.study_name}: held-out comparison"))
    console.print(f"policy written to {result.policy_path}", highlight=False)
    if cfg.grids_enabled:
        from tuner.search.grids import log_grids

        log_grids(rt, winner, records)


def write_winner(rt: Any, winner: Candidate, metrics: dict[str, float]) -> Path:
    """Write the policy file, register it and log it; returns its path."""
    from tuner.policy_file import write_policy_file
    from tuner.search.storage import ExportRecord
    from tuner.search.study import A_EXPORTED

    cfg = rt.cfg
    policy = winner.planned.policy  # fitted to the target, exactly what was evaluated
    tag = (cfg.mem_target.text.replace("%", "pct") if cfg.mem_target is not None
           else f"{cfg.metric}{cfg.quality_limit:g}")
    path = cfg.out_dir / f"policy_{cfg.model}_{tag}.json"
    provenance = {"study": cfg.study_name, "trial": winner.trial, "preset": winner.preset,
                  "mlflow_run_id": rt.tracker.run_id, "storage": cfg.storage, "sampler": cfg.sampler,
                  "seed": cfg.seed,
                  "metric": cfg.metric,  # the search target: `tuner policy check` matches on it
                  "mem_target": cfg.mem_target.text if cfg.mem_target is not None else None,
                  "quality_limit": cfg.quality_limit}
    write_policy_file(path, policy, rt.model_cfg, checkpoint_sha256=rt.checkpoint_sha256, metrics=metrics,
                      eval_spec=rt.final_spec, provenance=provenance, spec=rt.planner.spec)
    rt.tables.record_export(ExportRecord(cfg.study_name, winner.trial, str(path),
                                         winner.planned.key, rt.model_hash, metrics,
                                         rt.tracker.run_id))
    # also on the study, where optuna-dashboard and optuna.load_study show it
    rt.study.set_user_attr(A_EXPORTED, {"trial": winner.trial, "preset": winner.preset,
                                        "family": winner.family, "path": str(path)})
    rt.tracker.log_artifact(path, "policy")
    return path
