"""Multi-fidelity screening: rungs of image counts, the chunk each rung adds, and pooling chunks.

A screened trial is evaluated chunk by chunk. Chunk ``k`` holds the images between rung ``k-1`` and
rung ``k`` (rungs are cumulative counts: ``--min-samples``, then ×``--reduction-factor`` up to
``--samples``). After each chunk the driver pools the paired metrics of the chunks so far (exact: the
chunks are disjoint image sets, so means and standard errors combine as one sample), reports the
objective as the trial's intermediate value at step = images so far, and asks Optuna's
successive-halving pruner whether the trial may go on. Poor candidates stop after a few images; the
best reach ``--samples``. Every chunk is an evaluation of its own, cached by (plan, chunk spec), so a
re-queued or duplicate trial replays its chunks for free.

Only paired metrics can be pooled. A distribution metric (a Fréchet distance) is one number per image
set, meaningful only at :data:`~tuner.quality.metric_info.MIN_DISTRIBUTION_SAMPLES` images or more, so
a search on one screens in a single chunk of ``--samples`` images, and so do two-objective searches
(Optuna's pruners are single-objective).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuner.quality.metric_info import METRICS

CHUNK_SEED_STRIDE = 7919  # chunk k's batches are seeded seed + 7919·k + j: disjoint from other chunks
PAIRED_KEYS = tuple(m.name for m in METRICS.values() if m.paired)


@dataclass(frozen=True)
class Fidelity:
    """The screening schedule of one search.

    rungs: cumulative image counts, strictly increasing, the last = ``--samples``; one rung means
    single-fidelity screening (no pruning). reduction_factor: the pruner's η (keeps ~1/η per rung).
    """

    rungs: tuple[int, ...]
    reduction_factor: int = 4

    @property
    def pruning(self) -> bool:
        return len(self.rungs) > 1

    @property
    def samples(self) -> int:
        return self.rungs[-1]

    def describe(self) -> str:
        if not self.pruning:
            return f"{self.samples} images per trial"
        return (f"successive halving over {' → '.join(map(str, self.rungs))} images "
                f"(keeps ~1/{self.reduction_factor} per rung)")


def rungs_for(min_samples: int, samples: int, reduction_factor: int) -> tuple[int, ...]:
    """``min_samples·η^k`` below ``samples``, then ``samples`` (``(samples,)`` when min >= samples)."""
    rungs, n = [], min_samples
    while n < samples:
        rungs.append(n)
        n *= reduction_factor
    return tuple(rungs) + (samples,)


def chunk_specs(fidelity: Fidelity, whole: dict[str, Any]) -> list[dict[str, Any]]:
    """One evaluation spec per rung, cut from ``whole``, the ``--samples``-image screening spec
    (:func:`tuner.search.trials.eval_spec`): chunk ``k`` holds the labels of images
    ``rungs[k-1]:rungs[k]`` on its own seeds. A single rung is ``whole`` itself."""
    if not fidelity.pruning:
        return [whole]
    out, start = [], 0
    for k, end in enumerate(fidelity.rungs):
        out.append({**whole, "labels": whole["labels"][start:end],
                    "seed": whole["seed"] + CHUNK_SEED_STRIDE * k})
        start = end
    return out


def _pooled(parts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Mean and standard error of the union of samples given per part as ``(n, mean, se)``."""
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * p[1] for p in parts) / n
    # within-part sum of squares (se² · n · (n - 1)) plus the between-part spread
    ss = sum(p[2] ** 2 * p[0] * (p[0] - 1) + p[0] * (p[1] - mean) ** 2 for p in parts)
    return mean, (math.sqrt(ss / (n - 1) / n) if n > 1 else 0.0)


def pool_chunks(chunks: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of the chunks so far as one evaluation of all their images.

    Paired means and their ``*_se`` are pooled exactly; ``samples`` adds up; the plan's memory figures
    are the same in every chunk. Set metrics (Fréchet distances) and latencies cannot be pooled and are
    kept only for a single chunk.
    """
    if len(chunks) == 1:
        return dict(chunks[0])
    first = chunks[0]
    out = {k: v for k, v in first.items() if k in ("memory_fraction", "kv_bytes_per_image")
           or k.startswith("reference_")}
    out["samples"] = float(sum(c["samples"] for c in chunks))
    for key in PAIRED_KEYS:
        if not all(key in c for c in chunks):
            continue
        se_key = f"{key}_se"
        # an evaluator without standard errors: the chunks' means still pool exactly (se left out)
        parts = [(c["samples"], c[key], c.get(se_key, 0.0)) for c in chunks]
        if key == "psnr" and any(math.isinf(p[1]) for p in parts):
            if all(math.isinf(p[1]) for p in parts):  # identical images everywhere
                out[key], out[se_key] = math.inf, 0.0
                continue
            from tuner.quality.metrics import PSNR_CAP_DB  # a chunk of identical images: each at the cap

            parts = [(n, PSNR_CAP_DB, 0.0) if math.isinf(m) else (n, m, se) for n, m, se in parts]
        out[key], se = _pooled(parts)
        if all(se_key in c for c in chunks):
            out[se_key] = se
    return out
