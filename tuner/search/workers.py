"""Evaluation pools: the driver process itself here, Ray actors in :mod:`tuner.search.ray_pool`.

Both pools have the same small interface used by the driver: ``start() -> model info``,
``capacity``, ``idle``, ``submit(request)``, ``poll(timeout) -> [Outcome]``, ``cancel_all()``,
``status()`` and ``close()``. Requests and results are plain dicts (see
:class:`tuner.search.worker_host.WorkerHost`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from tuner.errors import UserError
from tuner.search.worker_host import WorkerHost


@dataclass
class Outcome:
    """A finished request: ``result`` (the worker's dict) or ``error``; ``attempts`` used."""

    request: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 1

    @property
    def task_id(self) -> int:
        return int(self.request["task_id"])


@contextlib.contextmanager
def _signals_abort():
    """While evaluating in the driver process, Ctrl-C or SIGTERM also aborts the evaluation (after the
    driver's own handler has recorded the interrupt), so the search stops at once instead of after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def default_cpu_workers() -> int:
    """Half the cores, at least 1, at most 8. Each gets :func:`tuner.threads.worker_threads` torch threads,
    ``(cores - 1) // workers``: one core is left to the driver (experiments/search/threads.md)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class InlinePool:
    """Evaluates in the driver process, one request per :meth:`poll` (``--workers 0``, tests)."""

    kind = "inline"

    def __init__(self, factory: str, factory_kwargs: dict[str, Any], threads: int | None = None):
        self.host = WorkerHost(factory, factory_kwargs, num_threads=threads)  # None: torch's default
        self.queue: list[dict[str, Any]] = []

    capacity = 1

    @property
    def idle(self) -> int:
        return 0 if self.queue else 1

    def start(self) -> dict[str, Any]:
        try:
            return self.host.ready()
        except UserError:
            raise
        except ValueError as exc:
            raise UserError(f"cannot start the evaluator: {exc}") from None

    def submit(self, request: dict[str, Any]) -> None:
        self.queue.append(request)

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.queue:
            time.sleep(min(timeout, 0.05))
            return []
        request = self.queue[0]
        try:
            with _signals_abort():
                res = self.host.evaluate(request)
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: the request stays queued; the driver re-queues its trial
            return []
        self.queue.pop(0)
        return [Outcome(request, result=res if "error" not in res else None, error=res.get("error"))]

    def cancel_all(self) -> list[dict[str, Any]]:
        cancelled, self.queue = self.queue, []
        return cancelled

    def status(self) -> str:
        return f"in-process evaluator ({'busy' if self.queue else 'idle'})"

    def close(self) -> None:
        self.queue = []
