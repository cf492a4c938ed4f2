"""``python -m tuner search`` as a user runs it, for the fault tests: real local Ray workers, the real
tiny evaluator at small sizes, presets on, MLflow to SQLite (or a real server), and the checks every
fault test ends with (read from the study database, the MLflow store and the OS)."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ProductSearch:
    """One study (storage, MLflow store, output directory) searched by the real CLI."""

    base: Path
    trials: int = 8
    storage: str = ""
    mlflow: str = ""
    out: Path | None = None
    samples: int = 2
    study: str = "faults"
    seen: set = field(default_factory=set)  # pids of every process a started search ever had below it
    logs: dict = field(default_factory=dict)  # pid -> its output file

    def __post_init__(self) -> None:
        self.storage = self.storage or f"sqlite:///{self.base / 'study.db'}"
        self.mlflow = self.mlflow or f"sqlite:///{self.base / 'mlflow.db'}"
        self.out = self.out or self.base / "out"
        # Ray's unix socket paths must stay under 107 bytes: a short temp dir, not pytest's tmp_path
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="tr-", dir="/tmp"))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tuner", "search", "--model", "tiny", "--mem-target", "15%",
                "--trials", str(self.trials), "--samples", str(self.samples), "--final-samples", "2",
                "--final-top-k", "1", "--workers", "1", "--device", "cpu", "--eval-batch-size", "2",
                "--study-name", self.study, "--storage", self.storage, "--mlflow-uri", self.mlflow,
                "--out", str(self.out), "--trial-timeout", "300", "--no-progress"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNER_", "MLFLOW_"))}
        env.update(TUNER_RAY_TMPDIR=str(self.ray_tmp), RAY_USAGE_STATS_ENABLED="0",
                   MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> subprocess.Popen:
        path = self.base / f"search-{len(self.logs)}.log"
        with open(path, "w") as log:
            proc = subprocess.Popen(self.argv(), cwd=self.base, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT)
        self.logs[proc.pid] = path
        return proc

    def run(self, timeout: float = 600) -> tuple[int, str]:
        """The identical command, to the end: (exit status, output)."""
        proc = self.start()
        self.watch(proc, lambda trials: False, timeout=timeout, until_exit=True)
        return proc.returncode, self.output(proc)

    def output(self, proc: subprocess.Popen) -> str:
        proc.wait(timeout=120)
        return self.logs[proc.pid].read_text()

    def descendants(self, proc: subprocess.Popen) -> list[psutil.Process]:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen |= {p.pid for p in kids}
        return kids

    def watch(self, proc: subprocess.Popen, pred, timeout: float = 300, until_exit: bool = False,
              on_tick=None) -> list:
        """Poll the study until ``pred(trials)`` holds (or the process exits, with ``until_exit``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.descendants(proc)
            if on_tick is not None:
                on_tick(proc)
            if proc.poll() is not None:
                if until_exit:
                    return self.trials_now()
                raise AssertionError(f"search exited ({proc.returncode}) early:\n{self.output(proc)[-3000:]}")
            trials = self.trials_now()
            if not until_exit and pred(trials):
                return trials
            time.sleep(0.2)
        proc.kill()
        raise AssertionError(f"timed out; output:\n{self.output(proc)[-3000:]}")

    def trials_now(self) -> list:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return optuna.load_study(study_name=self.study, storage=self.storage).trials
        except Exception:  # noqa: BLE001 - not created yet / locked
            return []

    # -- the checks every fault test ends with ---------------------------------------------------------
    def assert_whole(self) -> None:
        """Asked COMPLETE count (duplicates not counted), nothing RUNNING, no (plan, eval spec) evaluated
        twice, one MLflow run per COMPLETE trial, no process left over."""
        from tuner.search.storage import TunerTables

        from tests.search.helpers import counted

        trials = self.trials_now()
        states = Counter(t.state.name for t in trials)
        assert len([t for t in counted(trials) if t.state.name == "COMPLETE"]) == self.trials, states
        assert states["RUNNING"] == 0, states
        tables = TunerTables(self.storage)
        try:
            log = tables.evaluation_log(self.study)
        finally:
            tables.close()
        twice = [k for k, n in Counter((e["policy_hash"], e["eval_key"]) for e in log).items() if n > 1]
        assert not twice, f"evaluated more than once: {twice}"
        runs = mlflow_trial_runs(self.mlflow, self.study)
        complete = [t.number for t in trials if t.state.name == "COMPLETE"]
        assert {n: runs.get(n, 0) for n in complete} == {n: 1 for n in complete}, runs
        self.assert_no_leftovers()

    def assert_no_leftovers(self, grace_s: float = 30.0) -> None:
        """No process started below a search is alive (reparented orphans included), none uses its Ray dir."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = [p for p in map(_process, self.seen) if p is not None]
            alive += [p for p in psutil.process_iter(["cmdline"])
                      if str(self.ray_tmp) in " ".join(p.info["cmdline"] or ())]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        notes = "".join(f.read_text() for f in self.ray_tmp.glob("tuner-ray-reaper-*.log"))
        assert not alive, ([(p.pid, p.ppid(), " ".join(p.cmdline())[:60].strip()) for p in alive], notes)

    def cleanup(self) -> None:
        for pid in self.seen:
            p = _process(pid)
            if p is not None:
                p.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _process(pid: int) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p
    except psutil.NoSuchProcess:
        return None


def mlflow_trial_runs(uri: str, study: str) -> Counter:
    """Trial number -> number of MLflow trial runs of the study."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("varkv-tiny")
    if exp is None:
        return Counter()
    runs = client.search_runs([exp.experiment_id], max_results=50000,
                              filter_string=f"tags.`tuner.study` = '{study}' and tags.`tuner.role` = 'trial'")
    return Counter(int(r.data.tags["tuner.trial"]) for r in runs)


def non_loopback_listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``pids`` not on loopback."""
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        ip = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not (mapped or ip).is_loopback:
            name = _process(conn.pid).name() if _process(conn.pid) else "?"
            out.append((conn.laddr.ip, conn.laddr.port, name))
    return out


def evaluated(trials) -> int:
    return sum(t.state.name == "COMPLETE" for t in trials)


def running(trials) -> bool:
    return any(t.state.name == "RUNNING" for t in trials)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(base: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` with its store under ``base`` (answering /health)."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{base / 'srv.db'}",
                             "--artifacts-destination", str(base / "srv-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, "mlflow server exited"
    stop_mlflow_server(proc)
    raise AssertionError("mlflow server did not answer /health in 90 s")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Stop the server and every process of its session (its gunicorn/uvicorn workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
