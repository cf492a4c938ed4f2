"""When a search stops asking for new trials: trial budget, wall-clock timeout, patience, Ctrl-C, SIGTERM.

``--trials`` is the total number of finished trials the *study* should hold, so re-running the same
command after an interruption continues up to it rather than starting a new budget (trials cut short
by an interruption or a killed driver are re-queued and do not count). The timeout
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
    # consecutive duplicates (already-screened policies; they do not count) after which the space is
    # taken as exhausted: the sampler keeps proposing what it has seen
    max_duplicate_streak: int = 50
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    signal: str | None = None  # SIGINT or SIGTERM once interrupted

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention (130 for Ctrl-C, 143 for SIGTERM)."""
        import signal as _signal

        return 128 + int(getattr(_signal, self.signal or "SIGINT"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def reason(self, finished: int, since_improvement: int, duplicate_streak: int = 0) -> str | None:
        """Why no new trial should be asked, or None to continue (in-flight trials always finish)."""
        if self.interrupted:
            return "interrupted"
        if finished >= self.max_trials:
            return f"reached {self.max_trials} trials"
        if self.timeout_s is not None and self.elapsed() >= self.timeout_s:
            return f"timeout of {self.timeout_s:g} s"
        if self.patience is not None and since_improvement >= self.patience:
            return f"no improvement in {self.patience} evaluated trials"
        if duplicate_streak >= self.max_duplicate_streak:
            return (f"the sampler proposed {duplicate_streak} already-screened policies in a row "
                    "(the space looks exhausted)")
        return None

    def can_ask(self, finished: int, in_flight: int, since_improvement: int,
                duplicate_streak: int = 0) -> bool:
        return self.reason(finished + in_flight, since_improvement, duplicate_streak) is None


STOP_SIGNALS = ("SIGINT", "SIGTERM")


class InterruptFlag:
    """The first SIGINT (Ctrl-C) or SIGTERM sets ``rule.interrupted`` and ``rule.signal``: the driver
    stops asking, abandons what runs (re-queued for a resume) and exits with 128 + the signal number;
    a second one raises KeyboardInterrupt. Installed only in the main thread (signals cannot be
    elsewhere). :meth:`install` is idempotent and is called again after ``ray.init``, which puts its
    own SIGTERM handler (``sys.exit``) in place.
    """

    def __init__(self, rule: StopRule):
        self.rule = rule
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __enter__(self) -> "InterruptFlag":
        self.install()
        return self

    def _handle(self, signum, frame) -> None:
        if self.rule.interrupted:
            raise KeyboardInterrupt
        self.rule.interrupted = True
        self.rule.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
