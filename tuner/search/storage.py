"""One SQL database for the search (docs/design.md, Search): Optuna's tables plus ours, side by side.

Our tables (prefixed ``tuner_`` so they never collide with Optuna's):

- ``tuner_eval_cache``: metrics of one policy on one model and eval spec
  (model hash + policy hash + eval-spec key → metrics JSON), so identical policies are never
  evaluated twice, across trials, restarts and studies.
- ``tuner_exported_policies``: every policy file a search wrote (study, trial, path, metrics).
- ``tuner_evaluations``: an append-only log of every evaluation a driver received from a worker
  (study, session, plan, eval spec, images, seconds): the work a search really spent, and the proof
  that a resumed search evaluates nothing twice.
- ``tuner_sessions``: one row per running driver (host, pid, heartbeat). A RUNNING trial whose
  session is gone (the driver was killed) is stale and gets re-queued on resume; a RUNNING trial of a
  live driver sharing the database is left alone.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.search.liveness import pid_alive

SQLITE_TIMEOUT_S = 30  # concurrent drivers on one SQLite file wait for the write lock instead of failing
STALE_HEARTBEAT_S = 120.0


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


SQLITE_HEADER = b"SQLite format 3\x00"


def _is_sqlite_file(path: Path) -> bool:
    """An SQLite database file (its 16-byte header), or an empty file (SQLite makes it one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError:
        return False
    return head == SQLITE_HEADER or head == b""


def engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    if url.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def check_storage_url(url: str, flag: str = "--storage") -> None:
    """Prove the database can be opened before any evaluation; writes nothing.

    A SQLite file may not exist yet (it is created later), but its directory must be writable.
    """
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    path = _sqlite_path(url)
    if path is not None:
        parent = path.parent
        if path.exists():
            if not os.access(path, os.R_OK | os.W_OK):
                raise UserError(f"{flag} {url}: the database file is not readable and writable")
            if path.is_dir():
                raise UserError(f"{flag} {url} is a directory; give a database file like sqlite:///study.db")
            if not _is_sqlite_file(path):
                raise UserError(f"{flag} {url}: {path} is not an SQLite database "
                                f"(no 'SQLite format 3' header); "
                                f"pass a new file name or a database a search wrote "
                                f"(runs/<study>/{'mlflow' if flag == '--mlflow-uri' else 'study'}.db)")
        else:
            probe = parent
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir() or not os.access(probe, os.W_OK):
                raise UserError(f"{flag} {url}: directory {parent} cannot be created or written; "
                                f"pass a writable location")
            return
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
    except ImportError as exc:
        raise UserError(f"{flag} {url}: the database driver is not installed ({exc}); install it "
                        f"(e.g. pip install psycopg2-binary) or use sqlite:///study.db") from None
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise UserError(f"{flag} {url!r} is not a usable SQLAlchemy URL ({exc}); "
                        f"use e.g. sqlite:///study.db or postgresql://user@host/db") from None
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{flag} {url}: cannot connect ({reason}); check the URL and that the server "
                        f"is up") from None
    finally:
        engine.dispose()


def _retry_schema_race(create, attempts: int = 5):
    """Two drivers starting on a fresh database both try to create the tables; the loser sees
    "table ... already exists" (SQLite) or a unique violation: try again, the schema is there then."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return create()
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if (attempt == attempts - 1
                    or "exist" not in str(exc).lower() and "unique" not in str(exc).lower()):
                raise
            time.sleep(0.2 * (attempt + 1))


def open_optuna_storage(url: str):
    """Optuna's RDB storage for ``url`` (creates its tables on first use)."""
    import optuna

    return _retry_schema_race(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url)))


def _tables(metadata):
    from sqlalchemy import Column, DateTime, Float, Integer, String, Table, Text, func

    cache = Table(
        "tuner_eval_cache", metadata,
        Column("model_hash", String(128), primary_key=True),
        Column("policy_hash", String(64), primary_key=True),
        Column("eval_key", String(64), primary_key=True),
        Column("family", String(64), nullable=False),
        Column("params_json", Text, nullable=False),
        Column("metrics_json", Text, nullable=False),
        Column("seconds", Float),
        Column("created_at", DateTime, server_default=func.now()),
    )
    exported = Table(
        "tuner_exported_policies", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("study_name", String(512), nullable=False, index=True),
        Column("trial_number", Integer),
        Column("path", Text, nullable=False),
        Column("policy_hash", String(64), nullable=False),
        Column("model_hash", String(128), nullable=False),
        Column("metrics_json", Text, nullable=False),
        Column("mlflow_run_id", String(64)),
        Column("created_at", DateTime, server_default=func.now()),
    )
    sessions = Table(
        "tuner_sessions", metadata,
        Column("session_id", String(64), primary_key=True),
        Column("study_name", String(512), nullable=False, index=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("heartbeat", Float, nullable=False),
        Column("finished", Integer, nullable=False, default=0),
    )
    evaluations = Table(
        "tuner_evaluations", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("study_name", String(512), nullable=False, index=True),
        Column("session_id", String(64), nullable=False),
        Column("model_hash", String(128), nullable=False),
        Column("policy_hash", String(64), nullable=False),
        Column("eval_key", String(64), nullable=False),
        Column("images", Integer, nullable=False),
        Column("seconds", Float),
        Column("created_at", DateTime, server_default=func.now()),
    )
    return cache, exported, sessions, evaluations


@dataclass
class ExportRecord:
    study_name: str
    trial_number: int | None
    path: str
    policy_hash: str
    model_hash: str
    metrics: dict[str, float]
    mlflow_run_id: str | None


class TunerTables:
    """Our tables in the study database. Only the driver writes them (workers return plain dicts)."""

    def __init__(self, url: str):
        import sqlalchemy

        self.url = url
        self.engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
        self.metadata = sqlalchemy.MetaData()
        self.cache, self.exported, self.sessions, self.evaluations = _tables(self.metadata)
        _retry_schema_race(lambda: self.metadata.create_all(self.engine))

    def close(self) -> None:
        self.engine.dispose()

    # -- evaluation cache ------------------------------------------------------------------------------
    def cached_metrics(self, model_hash: str, policy_hash: str, eval_key: str) -> dict[str, float] | None:
        from sqlalchemy import select

        c = self.cache.c
        query = select(c.metrics_json).where(c.model_hash == model_hash, c.policy_hash == policy_hash,
                                             c.eval_key == eval_key)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else json.loads(row[0])

    def store_metrics(self, model_hash: str, policy_hash: str, eval_key: str, family: str,
                      params: dict[str, Any], metrics: dict[str, float],
                      seconds: float | None = None) -> None:
        """Insert once; a concurrent driver that stored the same key first wins (same numbers)."""
        from sqlalchemy.exc import IntegrityError

        row = dict(model_hash=model_hash, policy_hash=policy_hash, eval_key=eval_key, family=family,
                   params_json=json.dumps(params, sort_keys=True),
                   metrics_json=json.dumps(metrics, sort_keys=True), seconds=seconds)
        try:
            with self.engine.begin() as conn:
                conn.execute(self.cache.insert().values(**row))
        except IntegrityError:
            pass

    def log_evaluation(self, study_name: str, session_id: str, model_hash: str, policy_hash: str,
                       eval_key: str, images: int, seconds: float | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.evaluations.insert().values(
                study_name=study_name, session_id=session_id, model_hash=model_hash, policy_hash=policy_hash,
                eval_key=eval_key, images=int(images), seconds=seconds))

    def evaluation_log(self, study_name: str | None = None) -> list[dict[str, Any]]:
        """Every logged evaluation (oldest first), as dicts of the table's columns."""
        from sqlalchemy import select

        query = select(self.evaluations).order_by(self.evaluations.c.id)
        if study_name is not None:
            query = query.where(self.evaluations.c.study_name == study_name)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def cache_size(self, model_hash: str | None = None) -> int:
        from sqlalchemy import func, select

        query = select(func.count()).select_from(self.cache)
        if model_hash is not None:
            query = query.where(self.cache.c.model_hash == model_hash)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- exported policies -------------------------------------------------------------------------------
    def record_export(self, rec: ExportRecord) -> None:
        """Register a written policy file (a re-run that exports the same file again adds no row)."""
        last = self.exports(rec.study_name)
        if last and (last[-1].path, last[-1].policy_hash) == (rec.path, rec.policy_hash):
            return
        with self.engine.begin() as conn:
            conn.execute(self.exported.insert().values(
                study_name=rec.study_name, trial_number=rec.trial_number, path=rec.path,
                policy_hash=rec.policy_hash, model_hash=rec.model_hash,
                metrics_json=json.dumps(rec.metrics, sort_keys=True), mlflow_run_id=rec.mlflow_run_id))

    def exports(self, study_name: str | None = None) -> list[ExportRecord]:
        from sqlalchemy import select

        e = self.exported.c
        query = select(e.study_name, e.trial_number, e.path, e.policy_hash, e.model_hash, e.metrics_json,
                       e.mlflow_run_id).order_by(e.id)
        if study_name is not None:
            query = query.where(e.study_name == study_name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [ExportRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]) for r in rows]

    # -- driver sessions -----------------------------------------------------------------------------------
    def open_session(self, session_id: str, study_name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.sessions.insert().values(
                session_id=session_id, study_name=study_name, host=socket.gethostname(), pid=os.getpid(),
                heartbeat=time.time(), finished=0))

    def heartbeat(self, session_id: str, finished: bool = False) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.sessions.update().where(self.sessions.c.session_id == session_id)
                         .values(heartbeat=time.time(), finished=int(finished)))

    def live_sessions(self, study_name: str) -> set[str]:
        """Sessions of ``study_name`` whose driver still runs (same host: pid alive; else fresh heartbeat)."""
        from sqlalchemy import select

        s = self.sessions.c
        query = select(s.session_id, s.host, s.pid, s.heartbeat, s.finished).where(s.study_name == study_name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        host, now, live = socket.gethostname(), time.time(), set()
        for sid, h, pid, beat, finished in rows:
            if finished:
                continue
            alive = pid_alive(pid) if h == host else now - beat < STALE_HEARTBEAT_S
            if alive:
                live.add(sid)
        return live
