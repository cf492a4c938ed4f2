"""An MLflow outage never stops or hangs a search: the tracker behind a guard.

:class:`GuardedTracker` forwards every call to the real tracker. The first call that fails (server
stopped, network gone, a store error) prints one warning and marks tracking *down*; while it is down,
calls are skipped without waiting, except one attempt every :data:`RETRY_S` seconds. Trial records
skipped meanwhile are kept, and logged as soon as a call succeeds again. What is still missing when
the search ends is logged by the next run of the same command (``backfill``, which looks up the
study's child runs first, so no trial is ever logged twice). The Optuna study stays the source of
truth throughout: MLflow is a view of it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

RETRY_S = 30.0


def _reason(exc: BaseException) -> str:
    """A short cause: "server unreachable" for connection failures, else the first line of the error."""
    text = str(exc).strip()
    if any(word in text for word in ("Max retries exceeded", "Connection refused", "NewConnectionError")):
        return "server unreachable"
    return (text.splitlines()[0][:160] if text else "") or type(exc).__name__


class GuardedTracker:
    """Same interface as :class:`tuner.search.tracking.MlflowTracker`; never raises, never blocks for long."""

    def __init__(self, inner: Any, warn: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.inner, self.warn, self.clock = inner, warn, clock
        self.down_since: float | None = None
        self.last_try = 0.0
        self.gap: list[Any] = []  # trial records not logged while tracking was down
        self.failures = 0

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """(succeeded, result) of ``inner.<name>(...)``; skipped (False, None) while down between retries."""
        now = self.clock()
        if self.down and now - self.last_try < RETRY_S:
            return False, None
        self.last_try = now
        try:
            result = getattr(self.inner, name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure: the search goes on
            self.failures += 1
            if not self.down:
                self.down_since = now
                self.warn(f"warning: MLflow tracking failed ({_reason(exc)}); the search goes on without it "
                          f"and retries every {RETRY_S:.0f} s; what it misses is logged later")
            return False, None
        if self.down:
            self.down_since = None
            gap, self.gap = self.gap, []
            self.warn(f"MLflow tracking is back; logging {len(gap)} trial(s) it missed")
            for rec in gap:
                self.log_record(rec)
        return True, result

    def start_study(self, *args: Any, **kwargs: Any) -> str | None:
        return self.inner.start_study(*args, **kwargs)  # at start-up a failure is the user's error to see

    def log_record(self, rec: Any) -> None:
        ok, _ = self._call("log_record", rec)
        if not ok:
            self.gap.append(rec)

    def backfill(self, records: list[Any]) -> list[int]:
        ok, numbers = self._call("backfill", records)
        if ok:
            self.gap = []
        return numbers or []

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        self._call("log_artifact", *args, **kwargs)

    def log_image(self, *args: Any, **kwargs: Any) -> bool:
        ok, logged = self._call("log_image", *args, **kwargs)
        return bool(ok and logged)

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        self._call("log_metrics", *args, **kwargs)

    def finish(self, status: str = "FINISHED") -> None:
        self.last_try = float("-inf")  # one last attempt, whatever the retry clock says
        ok, _ = self._call("finish", status)
        if not ok and self.enabled:
            self.warn("warning: MLflow was unreachable at the end of the search: its study run may still "
                      "show RUNNING and some trials have no run yet; re-run the same command when the "
                      "server is back to log them")
