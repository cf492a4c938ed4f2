"""Pre-screening with the zero-generation proxy: rank many candidate policies before generating anything.

Once per study, before the first sampled trial, :func:`prescreen` draws ``--proxy-candidates`` random
points of the search space, fits each to the memory target (the planner), drops duplicate plans and
the ones over the target, and asks a worker for their proxy scores (:mod:`tuner.quality.proxy`: the
attention-output error of the kept, quantized cache replayed on recorded full-cache K/V; measured
Spearman ρ 0.81–0.91 with held-out PSNR at equal memory, experiments/search/proxy_rank.md). The best
``--proxy-top`` are enqueued as warm starts after the paper presets: the sampler's first guesses are
then the proxy's best instead of random points, and they still go through the multi-fidelity screening
like any trial. Only for searches fitted to a memory target (the proxy ranks policies of equal memory).
"""
from __future__ import annotations

import time
from typing import Any

from tuner.search import trials as T

A_PRESCREENED = "proxy_prescreened"  # study attribute: pre-screening ran (once per study)
A_PROXY_SCORE = "proxy_score"  # trial attribute of an enqueued candidate
PROXY_TASK_ID = -1  # the pool request id (no evaluation uses negative ids)
PROXY_TIMEOUT_S = 600.0


def candidates(rt: Any, n: int, seed: int) -> list[tuple[dict[str, Any], Any]]:
    """Up to ``n`` random points of the space as ``(trial params, planned)``, fitted, distinct plans that
    fit the target."""
    import optuna

    sampler = optuna.samplers.RandomSampler(seed=seed)
    scratch = optuna.create_study(sampler=sampler)  # in memory: nothing of it is stored
    out, seen = [], set()
    for _ in range(n):
        trial = scratch.ask()
        try:
            family, params = rt.space.suggest(trial)
            planned = rt.planner.plan(family, params)
        except (ValueError, KeyError, TypeError):
            continue
        if planned.fits and planned.key not in seen:
            seen.add(planned.key)
            out.append((dict(trial.params), planned))
    return out


def prescreen(rt: Any, n_candidates: int, top: int) -> str | None:
    """Score candidates by the proxy and enqueue the best ``top``; returns a one-line summary or None
    when it did not run (off, not a memory-target search, already done for this study)."""
    cfg = rt.cfg
    if n_candidates <= 0 or top <= 0 or not cfg.fits_to_target or rt.study.user_attrs.get(A_PRESCREENED):
        return None
    t0 = time.monotonic()
    cands = candidates(rt, n_candidates, cfg.seed)
    rt.study.set_user_attr(A_PRESCREENED, True)
    if not cands:
        return "proxy pre-screen: no candidate fits the target"
    rt.pool.submit({"task_id": PROXY_TASK_ID, "proxy": [{"family": p.family, "params": p.params}
                                                       for _, p in cands]})
    outcome = None
    deadline = time.monotonic() + PROXY_TIMEOUT_S
    while outcome is None and time.monotonic() < deadline:
        outcome = next(iter(rt.pool.poll(0.25)), None)
    if outcome is None or outcome.error is not None:
        why = "timed out" if outcome is None else outcome.error
        rt.pool.cancel_all()
        return f"proxy pre-screen skipped: {why}"
    scores = outcome.result["scores"]
    ranked = sorted(zip(scores, range(len(cands))))[:top]
    for score, i in ranked:
        params, planned = cands[i]
        rt.study.enqueue_trial(params, user_attrs={A_PROXY_SCORE: score,
                                                   T.A_FIXED: {"family": planned.family,
                                                               "params": planned.params}})
    return (f"proxy pre-screen: scored {len(cands)} distinct candidate policies without generating an image "
            f"in {time.monotonic() - t0:.1f} s; enqueued the best {len(ranked)} "
            f"(scores {ranked[0][0]:.4f} … {ranked[-1][0]:.4f})")
