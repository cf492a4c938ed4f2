"""Ends a local Ray cluster's processes when its driver dies, however it dies.

Ray stops its local cluster on ``ray.shutdown()``, and GCS and raylet notice a dead driver, but after
a SIGKILL of the driver some of raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)
live on as orphans of PID 1. :func:`start_reaper` marks the cluster: every process Ray starts inherits
the environment variable :data:`MARKER` with a value unique to this driver, which survives Ray's
renaming of its processes and their re-parenting. A small watcher process (``python -m
tuner.search.ray_reaper PID MARK``, in its own session so a signal to the driver's group spares it)
waits for the driver to exit, gives Ray :data:`GRACE_S` seconds to stop by itself, then ends what is
left: SIGTERM, and SIGKILL for what ignores it. Linux only (``/proc``); elsewhere nothing is started.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tuner.search.liveness import pid_alive

MARKER = "TUNER_RAY_CLUSTER"
GRACE_S = 3.0
POLL_S = 0.5


def start_reaper() -> str | None:
    """Mark the processes Ray is about to start and watch this process; returns the mark (or None)."""
    if not Path("/proc/self/environ").exists():
        return None
    mark = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER] = mark
    subprocess.Popen([sys.executable, "-m", "tuner.search.ray_reaper", str(os.getpid()), mark],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    return mark


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``MARKER=mark`` (other than this one)."""
    needle = f"{MARKER}={mark}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry.name))
    return out


def reap(mark: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL, every process carrying ``mark``; returns the pids it signalled."""
    deadline = time.monotonic() + grace_s
    while marked_pids(mark) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    signalled = marked_pids(mark)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
    return signalled


def main(argv: list[str]) -> int:
    driver, mark = int(argv[0]), argv[1]
    while pid_alive(driver):
        time.sleep(POLL_S)
    reap(mark)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
