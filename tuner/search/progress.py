"""Live progress of a search: a status panel (rich ``Live``) plus one line per finished trial.

On a terminal the panel refreshes in place (trials done/total, best feasible, Pareto size, workers,
running, cache hits, infeasible, failed, elapsed); elsewhere (CI logs, pipes) only the per-trial lines
and a final summary are printed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Snapshot:
    done: int
    total: int
    running: int
    evaluated: int
    plan_infeasible: int
    failed: int
    cache_hits: int
    best: str
    pareto_size: int
    workers: str
    elapsed_s: float
    note: str = ""
    pruned: int = 0
    duplicates: int = 0


def render(s: Snapshot) -> Any:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("trials", f"{s.done}/{s.total} done, {s.running} running  "
                            f"({s.evaluated} evaluated, {s.pruned} pruned, {s.cache_hits} from cache, "
                            f"{s.duplicates} duplicates not counted, "
                            f"{s.plan_infeasible} over memory, {s.failed} failed)")
    table.add_row("best feasible", s.best)
    table.add_row("pareto front", f"{s.pareto_size} policies")
    table.add_row("workers", s.workers)
    table.add_row("elapsed", f"{s.elapsed_s:.0f} s" + (f"  {s.note}" if s.note else ""))
    return table


class ProgressView:
    """Context manager; ``update(snapshot)`` refreshes, ``line(text)`` prints above the panel."""

    def __init__(self, console: Any, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = None

    def __enter__(self) -> "ProgressView":
        if self.enabled and self.console is not None and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def update(self, snapshot: Snapshot) -> None:
        if self.live is not None:
            self.live.update(render(snapshot))

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


def trial_line(number: int, state: str, family: str | None, metrics: dict[str, float], metric: str,
               feasible: bool | None, note: str = "") -> str:
    """``trial 12  COMPLETE  ams  mem 0.142  fid_vs_full 3.210  feasible``."""
    parts = [f"trial {number:>4}", f"{state:<10}", f"{family or '-':<8}"]
    if "memory_fraction" in metrics:
        parts.append(f"mem {metrics['memory_fraction']:.4f}")
    if metric in metrics:
        parts.append(f"{metric} {metrics[metric]:.4g}")
    if feasible is not None:
        parts.append("feasible" if feasible else "infeasible")
    if note:
        parts.append(note)
    return "  ".join(parts)
