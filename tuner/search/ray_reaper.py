"""Ends a local Ray cluster's processes when its driver dies, however it dies.

Ray stops its local cluster on ``ray.shutdown()``, and GCS and raylet notice a dead driver, but after
a SIGKILL of the driver some of raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)
live on as orphans of PID 1. A small watcher process (``python -m tuner.search.ray_reaper PID MARK
LOG``, in its own session so a signal to the driver's group spares it) keeps a list of every process
below the driver (pid and start time, from ``/proc``) while the driver runs. Once the driver is gone
it gives Ray :data:`GRACE_S` seconds to stop by itself, then ends what is left of that list, their
own children, and every process whose environment carries the cluster's mark (:data:`MARKER`, set
before Ray starts): rounds of SIGTERM then SIGKILL until nothing is left. Two ways to find them,
because neither is enough alone: an agent started after the last look is not on the list yet, and
Ray's process titles (setproctitle) can overwrite the memory that ``/proc/PID/environ`` shows.
Linux only (``/proc``); elsewhere nothing is started.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tuner.search.liveness import pid_alive

MARKER = "TUNER_RAY_CLUSTER"
GRACE_S = 3.0
REAP_DEADLINE_S = 30.0
POLL_S = 0.5


def start_reaper(log_dir: str | None = None) -> str | None:
    """Mark the processes Ray is about to start and watch this process; returns the mark (or None).

    The watcher notes what it did in ``<log_dir>/tuner-ray-reaper-<mark>.log`` (the Ray temp dir's
    parent when the search sets one, else the system temp dir)."""
    if not Path("/proc/self/environ").exists():
        return None
    mark = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER] = mark
    log = Path(log_dir or tempfile.gettempdir()) / f"tuner-ray-reaper-{mark}.log"
    subprocess.Popen([sys.executable, "-m", "tuner.search.ray_reaper", str(os.getpid()), mark, str(log)],
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


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start time in clock ticks)`` of ``pid`` from ``/proc/PID/stat``, or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every process below ``root`` (pid -> start time), this watcher excluded."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry.name))
                starts[int(entry.name)] = info[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child != os.getpid() and child not in out:
                out[child] = starts[child]
                todo.append(child)
    return out


def _still_ours(known: dict[int, int]) -> list[int]:
    """The listed processes that still run as the same process (same start time), and their children."""
    alive = [pid for pid, start in known.items() if (_stat(pid) or (0, -1))[1] == start]
    found = set(alive)
    for pid in alive:
        found |= set(descendants(pid))
    return sorted(found)


def reap(mark: str, known: dict[int, int] | None = None, grace_s: float = GRACE_S,
         deadline_s: float = REAP_DEADLINE_S, log=lambda text: None) -> list[int]:
    """End the listed processes (``known``: pid -> start time) and every one carrying ``mark``.

    Ray gets ``grace_s`` to stop by itself. Then rounds of SIGTERM, a pause, and SIGKILL for what is
    left, until nothing remains or ``deadline_s`` passed (a raylet still alive during a round can
    start a replacement agent). Returns the pids it signalled.
    """
    known = known or {}

    def left() -> list[int]:
        return sorted(set(_still_ours(known)) | set(marked_pids(mark)))

    start = time.monotonic()
    while left() and time.monotonic() - start < grace_s:
        time.sleep(POLL_S)
    signalled: list[int] = []
    while time.monotonic() - start < grace_s + deadline_s:
        targets = left()
        if not targets:
            break
        log(f"ending {targets}")
        signalled += [pid for pid in targets if pid not in signalled]
        for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.5)):
            for pid in left():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(pause)
    log(f"done; left: {left()}")
    return signalled


def main(argv: list[str]) -> int:
    driver, mark = int(argv[0]), argv[1]
    log_path = Path(argv[2]) if len(argv) > 2 else None

    def log(text: str) -> None:
        if log_path is None:
            return
        try:  # the watcher's job matters more than its notes
            with open(log_path, "a") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} driver {driver}: {text}\n")
        except OSError:
            pass

    log("watching")
    known: dict[int, int] = {}
    while pid_alive(driver):
        known.update(descendants(driver))
        time.sleep(POLL_S)
    log(f"driver gone; {len(known)} process(es) were below it")
    reap(mark, known, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
