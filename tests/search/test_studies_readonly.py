"""``tuner studies`` / ``tuner show`` are read-only: a database without Optuna's tables (an MLflow store,
any other SQLite database) is refused with one error line and is never written to; a study database
gets no table it did not have."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.search.studies import list_studies, show_study

ROOT = Path(__file__).resolve().parents[2]


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """A real MLflow SQLite tracking store with one experiment (what `tuner search` writes as mlflow.db)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("runs") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").create_experiment("x")
    assert "experiments" in tables(path) and "studies" not in tables(path)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["studies"], ["show", "some-study"]])
def test_an_mlflow_store_is_refused_and_left_untouched(mlflow_db, command):
    before, before_bytes = tables(mlflow_db), digest(mlflow_db)
    url = f"sqlite:///{mlflow_db}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-m", "tuner", *command, "--storage", url], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=100)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --storage {url}: not a tuner/Optuna study database"), lines[0]
    assert "looks like an MLflow store" in lines[0] and "sqlite:///runs/<study>/study.db" in lines[0]
    assert tables(mlflow_db) == before  # no Optuna (or tuner_*) table was created
    assert digest(mlflow_db) == before_bytes  # not a byte written


@pytest.mark.timeout(60)
def test_other_sqlite_databases_are_refused_without_writes(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    cases = [(other, "it has no Optuna tables (studies, version_info)"), (empty, "it has no tables")]
    for path, what in cases:
        before = digest(path)
        for call in (lambda url: list_studies(url), lambda url: show_study(url, "s")):
            with pytest.raises(UserError) as info:
                call(f"sqlite:///{path}")
            assert "not a tuner/Optuna study database" in str(info.value) and what in str(info.value)
            assert "\n" not in str(info.value)
        assert digest(path) == before


@pytest.mark.timeout(60)
def test_reading_a_study_database_adds_no_tables(tmp_path):
    import optuna

    from tuner.search.storage import TunerTables, open_optuna_storage

    path = tmp_path / "study.db"
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="s1", storage=open_optuna_storage(url))
    study.tell(study.ask(), 1.0)
    bare = tables(path)
    assert not [t for t in bare if t.startswith("tuner_")]
    [summary] = list_studies(url)  # a plain Optuna database: listed, nothing of ours created
    assert (summary.name, summary.trials, summary.objective) == ("s1", 1, "(not a tuner study)")
    assert show_study(url, "s1") == (None, [], [])
    assert tables(path) == bare
    TunerTables(url).close()  # now with our tables, minus one (a database of an older tuner)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE tuner_sessions")
    before = tables(path)
    assert "tuner_exported_policies" in before and "tuner_sessions" not in before
    assert list_studies(url)[0].exported is None
    assert tables(path) == before
