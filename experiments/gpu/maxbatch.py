"""The largest batch that fits: a bounded doubling + bisection search over a probe, and the two probes.

The search starts at the planner's prediction (``tuner plan --gpu-mem``), because that batch is
the one that must fit (an OOM there is a planner mismatch) and the answer is expected near it. It
doubles until a probe fails, then bisects until the gap is within ``resolution`` of the batch.
Every probe is bounded: it is not started when the time predicted from the largest probe so far
(time grows about linearly with the batch) exceeds the per-probe limit or the time left, and at
most ``max_probes`` run. A search cut short reports its bounds instead of pretending to a value.

Probes:

- :func:`cuda_probe`: one real generation (``tuner bench``'s ``run_bench``, warm-up 0, 1 repeat)
  under the device-memory cap; ``torch.cuda.OutOfMemoryError`` means "does not fit". Memory is freed
  between probes (garbage collection + ``empty_cache``) so a failed probe does not shrink the next.
- :func:`allocation_probe` (CPU dry run): "fits" is decided by the planner's budget, with the
  KV term replaced by the bytes of the engine's own KV buffers (``KVCache``) allocated for that
  batch, so it exercises the search and the planned-vs-allocated comparison without a GPU.
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


@dataclass
class Probe:
    """One tried batch: whether it fit, how long it took, the memory it peaked at, the KV bytes it
    allocated."""

    batch: int
    fits: bool
    seconds: float
    peak_bytes: int | None = None
    kv_bytes: int | None = None
    error: str | None = None  # anything but "out of memory": a bug, reported, not a "does not fit"


@dataclass
class SearchResult:
    """``measured``: largest batch seen to fit (0: none); ``upper``: smallest seen to fail (None: none)."""

    measured: int
    upper: int | None
    complete: bool
    stop_reason: str
    probes: list[Probe] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def search_max_batch(probe: Callable[[int], Probe], start: int, *, max_probes: int, resolution: float,
                     probe_limit_s: float, time_left: Callable[[], float],
                     reference: tuple[int, float] | None = None,
                     on_probe: Callable[[Probe], None] | None = None) -> SearchResult:
    """Largest batch with ``probe(b).fits``, starting at ``start``; see the module docstring for the bounds.

    ``reference``: ``(batch, seconds)`` of a run measured before (the benchmark), so that even the
    first probe is predicted and bounded. ``on_probe`` sees every probe as it ends (partial results
    survive a kill).
    """
    lo, hi = 0, None
    probes: list[Probe] = []
    b = max(1, int(start))
    reason = ""
    while True:
        if len(probes) >= max_probes:
            reason = f"probe limit ({max_probes}) reached"
            break
        fitted = [(p.batch, p.seconds) for p in probes if p.fits and p.seconds > 0]
        if reference is not None and not fitted:
            fitted = [reference]
        if fitted:  # time of the largest run that went to the end, scaled to this batch
            ref_batch, ref_seconds = max(fitted)
            predicted = ref_seconds * b / ref_batch
            if predicted > probe_limit_s or predicted > time_left():
                reason = f"batch {b} predicted to take {predicted:.0f} s (limit {probe_limit_s:.0f} s, " \
                         f"{max(0.0, time_left()):.0f} s left)"
                break
        elif time_left() <= 0:
            reason = "no time left"
            break
        p = probe(b)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        print(f"  probe batch {b}: {'fits' if p.fits else 'does not fit'} ({p.seconds:.1f} s)"
              + (f" error: {p.error}" if p.error else ""), flush=True)
        if p.error:
            hi = b if hi is None else min(hi, b)
            reason = f"probe at batch {b} failed: {p.error}"
            break
        if p.fits:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if hi is None:
            b = 2 * lo
        elif lo == 0:
            if hi <= 1:
                reason = "not even batch 1 fits"
                break
            b = hi // 2
        elif hi - lo <= max(1, int(resolution * lo)):
            return SearchResult(lo, hi, True, f"bracketed within {100 * resolution:g}%", probes)
        else:
            b = (lo + hi) // 2
    return SearchResult(lo, hi, False, reason, probes)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m.lower() in str(exc).lower() for m in OOM_MARKERS)


def _attempt(fn: Callable[[], dict]) -> tuple[dict | None, str | None, bool]:
    """``(result, error, oom)`` of ``fn()``; only strings leave the ``except`` so no frame (and no tensor)
    survives."""
    try:
        return fn(), None, False
    except Exception as exc:  # noqa: BLE001 - an OOM is data; anything else is reported as the probe's error
        oom = _is_oom(exc)
        return None, None if oom else (f"{type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"), oom


def free_cuda_memory() -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def cuda_probe(run_one: Callable[[int], dict]) -> Callable[[int], Probe]:
    """A probe that runs ``run_one(batch)`` (a ``run_bench`` dict) and reports OOM as "does not fit"."""
    import torch

    def probe(batch: int) -> Probe:
        free_cuda_memory()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result, error, oom = _attempt(lambda: run_one(batch))
        if result is not None:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = int(torch.cuda.max_memory_allocated())
        free_cuda_memory()
        return Probe(batch, result is not None, seconds, peak,
                     None if result is None else int(result["kv_bytes_allocated"]), error)

    return probe


def allocation_probe(*, plan, geometry, dtype, policy, backend: str, fixed_bytes: int,
                     activation_bytes_per_image: int, device_mem_bytes: int) -> Callable[[int], Probe]:
    """The CPU stand-in: fits when ``fixed + KV allocated + batch × activations <= device memory``.

    ``fixed_bytes`` (weights + reserve) and the activation term are the planner's; the KV term is
    measured from the buffers :class:`tuner.model.cache.KVCache` allocates for ``2 × batch`` rows.
    """
    from varkv_kernels.dispatch import kv_attention
    from tuner.model.cache import KVCache

    def probe(batch: int) -> Probe:
        t0 = time.perf_counter()
        cache = KVCache(plan, geometry, rows=2 * batch, dtype=dtype, device="cpu", policy=policy,
                        attention=kv_attention, backend=backend)
        kv = int(cache.kv_bytes)
        del cache
        gc.collect()
        usage = fixed_bytes + kv + batch * activation_bytes_per_image
        return Probe(batch, usage <= device_mem_bytes, time.perf_counter() - t0, usage, kv)

    return probe
