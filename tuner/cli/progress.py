"""Progress of one long CLI step on stderr: a rich bar on a terminal, plain throttled lines elsewhere.

Why both: a rich bar shows nothing when stderr is a pipe or a CI log, so minutes of calibration
looked like a hang. Off a terminal, :class:`PlainLines` writes ``calibrating d16: 4.9/16 images (31%),
52 s elapsed``: on the first update, then each further :data:`PLAIN_STEP` of the total but at most
one line per :data:`PLAIN_MIN_INTERVAL_S` (a heartbeat after :data:`PLAIN_HEARTBEAT_S` without one
while anything moved), and always when the step is done. stdout is never written (``--json`` and
tables stay clean).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

PLAIN_STEP = 0.1  # a line per 10% of the total ...
PLAIN_MIN_INTERVAL_S = 5.0  # ... at most one every 5 s (a fast step prints its first and last line only)
PLAIN_HEARTBEAT_S = 30.0  # ... and one at least every 30 s while the count moves (slow steps)


def format_count(done: float) -> str:
    """``3`` for whole counts, ``3.4`` for the fractional ones of a finer-grained step."""
    return str(int(done)) if float(done).is_integer() else f"{done:.1f}"


class PlainLines:
    """``update(done)`` writes a throttled ``description: done/total unit (pct), elapsed`` line.

    ``echo``: where a line goes (one string, no newline); ``clock``: seconds, monotonic (tests pass a
    fake one). The first update always prints, so does the first that reaches ``total``; later ones
    are ignored.
    """

    def __init__(self, description: str, total: float, unit: str, echo: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, step: float = PLAIN_STEP,
                 min_interval_s: float = PLAIN_MIN_INTERVAL_S, heartbeat_s: float = PLAIN_HEARTBEAT_S):
        self.description, self.total, self.unit = description, total, unit
        self.echo, self.clock = echo, clock
        self.step, self.min_interval_s, self.heartbeat_s = step, min_interval_s, heartbeat_s
        self.start = clock()
        self.last_done: float | None = None
        self.last_t = self.start
        self.finished = False

    def update(self, done: float) -> None:
        if self.finished:
            return
        now = self.clock()
        since = now - self.last_t
        moved = 0.0 if self.last_done is None else done - self.last_done
        if done >= self.total:
            self.finished = True
            self.echo(f"{self.description}: {format_count(done)}/{format_count(self.total)} {self.unit} "
                      f"(100%), done in {now - self.start:.1f} s")
        elif (self.last_done is None
              or (moved >= self.step * self.total and since >= self.min_interval_s)
              or (moved > 0 and since >= self.heartbeat_s)):
            pct = 100.0 * done / self.total if self.total else 100.0
            self.echo(f"{self.description}: {format_count(done)}/{format_count(self.total)} {self.unit} "
                      f"({pct:.0f}%), {now - self.start:.0f} s elapsed")
        else:
            return
        self.last_done, self.last_t = done, now


@contextlib.contextmanager
def step_progress(description: str, total: float, unit: str = "images",
                  quiet: bool = False) -> Iterator[Callable[[float], None]]:
    """Yield ``update(done)`` for a step of ``total`` units: a transient rich bar when stderr is a
    terminal, :class:`PlainLines` otherwise, nothing at all with ``quiet``. ``done`` may be fractional
    (e.g. the scales of a batch)."""
    if quiet:
        yield lambda done: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        import typer

        yield PlainLines(description, total, unit, lambda line: typer.echo(line, err=True)).update
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda done: progress.update(task, completed=done)
