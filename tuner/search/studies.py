"""Reading searches back: ``tuner studies`` (all studies in a storage) and ``tuner show STUDY``.

Read-only: nothing here creates a database, a table or a study.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.search import trials as T
from tuner.mem_target import MemTarget
from tuner.search.objective import Objective


@dataclass
class StudySummary:
    name: str
    trials: int
    complete: int
    evaluated: int
    feasible: int
    objective: str
    best: str
    exported: str | None


def _open(storage_url: str):
    from tuner.search.storage import _sqlite_path, check_storage_url

    path = _sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"--storage {storage_url}: no such database file; pass the storage of a search "
                        f"(default sqlite:///runs/<study>/study.db)")
    check_storage_url(storage_url)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from tuner.search.storage import open_optuna_storage

    return open_optuna_storage(storage_url)


def objective_of(study: Any) -> Objective | None:
    """The objective a tuner study was created with (from its identity attribute)."""
    from tuner.search.study import A_IDENTITY

    ident = study.user_attrs.get(A_IDENTITY)
    if not ident:
        return None
    mem = ident.get("mem_target")
    target = None
    if isinstance(mem, (int, float)):
        target = MemTarget(fraction=float(mem), text=f"{100 * mem:g}%")
    elif isinstance(mem, str) and mem.endswith("B"):
        target = MemTarget(bytes_per_image=int(mem[:-1]), text=mem)
    return Objective(ident.get("metric", "fid_vs_full"), target, ident.get("quality_limit"))


def _exports(storage_url: str) -> dict[str, list]:
    from tuner.search.storage import TunerTables

    import sqlalchemy

    engine = sqlalchemy.create_engine(storage_url)
    try:
        if not sqlalchemy.inspect(engine).has_table("tuner_exported_policies"):
            return {}
    finally:
        engine.dispose()
    tables = TunerTables(storage_url)
    try:
        out: dict[str, list] = {}
        for rec in tables.exports():
            out.setdefault(rec.study_name, []).append(rec)
        return out
    finally:
        tables.close()


def list_studies(storage_url: str) -> list[StudySummary]:
    import optuna

    storage = _open(storage_url)
    exports = _exports(storage_url)
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        records = T.load_records(study)
        objective = objective_of(study)
        best_text = "-"
        feasible = [r for r in records if r.feasible]
        if objective is not None and feasible:
            best = T.best_records(records, 10**6, objective.multi)
            if objective.multi:
                best_text = f"pareto front of {len(best)}"
            else:
                b = best[0]
                best_text = (f"trial {b.number} {b.family}: memory {b.metrics.get('memory_fraction', 0):.4f}, "
                             f"{objective.metric} {b.metrics.get(objective.metric, float('nan')):.4g}")
        exp = exports.get(s.study_name)
        out.append(StudySummary(s.study_name, len(study.trials), sum(r.state == "COMPLETE" for r in records),
                                sum(r.evaluated for r in records), len(feasible),
                                objective.describe() if objective else "(not a tuner study)", best_text,
                                exp[-1].path if exp else None))
    return out


def show_study(storage_url: str, name: str) -> tuple[Objective | None, list[T.TrialRecord], list]:
    """(objective, Pareto-front records ordered by memory, exported-policy records) of one study."""
    import optuna

    from tuner.search.report import front_records

    storage = _open(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise UserError(f"no study {name!r} in {storage_url}; studies there: {', '.join(names) or 'none'}") from None
    objective = objective_of(study)
    records = T.load_records(study)
    front = front_records(records, objective) if objective is not None else []
    return objective, front, _exports(storage_url).get(name, [])


def exists(path: str | None) -> bool:
    return bool(path) and Path(path).exists()
