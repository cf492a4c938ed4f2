"""CPU threads: ``--threads N`` for one process, and how many torch threads each CPU search worker gets.

Why it matters: torch's intra-op pool (OpenMP) waits at the end of every operator for its slowest
thread, so a process with as many threads as the machine has cores collapses as soon as anything
else wants a core: one thread is descheduled and the others wait for it. Measured on the project's
2-core box (``experiments/threads_bench.py``, experiments/search/threads.md), tiny generation: one
worker with 2 threads runs at 0.04-0.13x the rate of a 1-thread worker while someone else's job
keeps one core busy (0.04-0.29x next to our search driver's Optuna loop alone), and gains only
0.85-1.52x on a quiet box; two 1-thread worker processes make 1.71-1.85x one worker there.

The rule (:func:`worker_threads`): the workers together use at most ``cpus - driver_reserve`` threads,
at least 1 each. One core is left to the driver, which runs Optuna's sampler (~0.2 s per trial),
the storage and the tracking in the main process, and to Ray's own processes; giving up at most
~1.5x on a quiet box avoids an 8-25x collapse whenever anything else runs. A 1-core machine gives
its one worker 1 thread (nothing to leave).
"""
from __future__ import annotations

from tuner.errors import UserError

DRIVER_RESERVE = 1  # cores left to the search driver (and Ray's processes) on a machine with more than one


def check_threads(n: int | None, flag: str = "--threads") -> None:
    """One-line UserError unless ``n`` is None (torch's default) or a count >= 1."""
    if n is not None and n < 1:
        raise UserError(f"{flag} {n} must be at least 1")


def apply_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` for this process (intra-op threads); None leaves torch's default.

    Validated first (:func:`check_threads`), so a bad count fails before torch is imported.
    """
    check_threads(n)
    if n is None:
        return
    import torch

    torch.set_num_threads(n)


def worker_threads(cpus: int, workers: int, driver_reserve: int = DRIVER_RESERVE) -> int:
    """Torch threads per CPU search worker: ``(cpus - driver_reserve) // workers``, at least 1.

    ``cpus``: cores the workers share (the local cluster's CPU count); ``workers``: concurrent worker
    processes. The reserve is only taken when ``cpus > driver_reserve`` (a 1-core machine still
    gives 1 thread). Why leave a core: see the module docstring.
    """
    if cpus < 1 or workers < 1 or driver_reserve < 0:
        raise ValueError(f"worker_threads needs cpus >= 1, workers >= 1 and driver_reserve >= 0, got "
                         f"{cpus}, {workers}, {driver_reserve}")
    usable = cpus - driver_reserve if cpus > driver_reserve else cpus
    return max(1, usable // workers)
