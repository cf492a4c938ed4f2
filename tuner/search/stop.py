"""When a search stops asking for new trials: trial budget, wall-clock timeout, patience, Ctrl-C.

``--trials`` is the total number of finished trials the *study* should hold, so re-running the same
command after an interruption continues up to it rather than starting a new budget. The timeout
and the patience apply to this invocation.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field


@dataclass
class StopRule:
    max_trials: int
    timeout_s: float | None = None
    patience: int | None = None
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def reason(self, finished: int, since_improvement: int) -> str | None:
        """Why no new trial should be asked, or None to continue (in-flight trials always finish)."""
        if self.interrupted:
            return "interrupted"
        if finished >= self.max_trials:
            return f"reached {self.max_trials} trials"
        if self.timeout_s is not None and self.elapsed() >= self.timeout_s:
            return f"timeout of {self.timeout_s:g} s"
        if self.patience is not None and since_improvement >= self.patience:
            return f"no improvement in {self.patience} evaluated trials"
        return None

    def can_ask(self, finished: int, in_flight: int, since_improvement: int) -> bool:
        return self.reason(finished + in_flight, since_improvement) is None


class InterruptFlag:
    """First Ctrl-C sets ``rule.interrupted`` (the driver then stops cleanly); a second one raises
    KeyboardInterrupt as usual. Installed only in the main thread (signals cannot be elsewhere)."""

    def __init__(self, rule: StopRule):
        self.rule = rule
        self._previous = None

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.rule.interrupted:
            raise KeyboardInterrupt
        self.rule.interrupted = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
