"""Reading searches back: ``tuner studies`` (all studies in a storage) and ``tuner show STUDY``.

Read-only: nothing here creates a database, a table or a study. Before Optuna's RDB storage is
opened (it would create its tables in any database) the database is inspected with SQLAlchemy, and
one without Optuna's tables (an MLflow store, another application's database) is refused; the
storage is then opened with ``skip_table_creation``, and our ``tuner_*`` tables are only read.
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


OPTUNA_TABLES = ("studies", "version_info")  # what every Optuna RDB storage has (and nothing else has)
_MLFLOW_TABLES = {"experiments", "runs"}


def _table_names(storage_url: str) -> set[str]:
    """The tables of the database, read without writing anything."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    from tuner.search.storage import engine_kwargs

    engine = sqlalchemy.create_engine(storage_url, **engine_kwargs(storage_url))
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--storage {storage_url}: cannot read the database ({reason}); pass the study.db of "
                        f"a search, e.g. sqlite:///runs/<study>/study.db") from None
    finally:
        engine.dispose()


def _open(storage_url: str):
    from tuner.search.storage import _sqlite_path, check_storage_url, engine_kwargs

    path = _sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"--storage {storage_url}: no such database file; pass the storage of a search "
                        f"(default sqlite:///runs/<study>/study.db)")
    check_storage_url(storage_url)
    tables = _table_names(storage_url)
    missing = [t for t in OPTUNA_TABLES if t not in tables]
    if missing:
        if not tables:
            what = "it has no tables"
        elif _MLFLOW_TABLES <= tables:
            what = "it has no Optuna tables; it looks like an MLflow store"
        else:
            what = f"it has no Optuna tables ({', '.join(missing)})"
        raise UserError(f"--storage {storage_url}: not a tuner/Optuna study database ({what}); pass the "
                        f"study.db of a search, e.g. sqlite:///runs/<study>/study.db")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # skip_table_creation: an Optuna database missing a table is not repaired behind the user's back
        return optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs(storage_url),
                                          skip_table_creation=True)
    except RuntimeError as exc:  # a schema written by another Optuna version
        raise UserError(f"--storage {storage_url}: {str(exc).strip().splitlines()[0]}") from None


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
    """Exported-policy records by study, read from ``tuner_exported_policies`` (never created here:
    :class:`~tuner.search.storage.TunerTables` would create every missing ``tuner_*`` table)."""
    import json

    import sqlalchemy

    from tuner.search.storage import ExportRecord, engine_kwargs

    engine = sqlalchemy.create_engine(storage_url, **engine_kwargs(storage_url))
    try:
        if not sqlalchemy.inspect(engine).has_table("tuner_exported_policies"):
            return {}
        table = sqlalchemy.Table("tuner_exported_policies", sqlalchemy.MetaData(), autoload_with=engine)
        e = table.c
        query = sqlalchemy.select(e.study_name, e.trial_number, e.path, e.policy_hash, e.model_hash,
                                  e.metrics_json, e.mlflow_run_id).order_by(e.id)
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    finally:
        engine.dispose()
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r[0], []).append(ExportRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]))
    return out


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
                best_text = (f"trial {b.number} {b.family}: "
                             f"memory {b.metrics.get('memory_fraction', 0):.4f}, "
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
        raise UserError(f"no study {name!r} in {storage_url}; "
                        f"studies there: {', '.join(names) or 'none'}") from None
    objective = objective_of(study)
    records = T.load_records(study)
    front = front_records(records, objective) if objective is not None else []
    return objective, front, _exports(storage_url).get(name, [])


def exists(path: str | None) -> bool:
    return bool(path) and Path(path).exists()
