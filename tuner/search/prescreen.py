"""Warm starts ranked by the zero-generation proxy: order the first trials before generating anything.

Once per study, before the first sampled trial, :func:`warm_start` draws ``--proxy-candidates`` random
points of the search space, fits each to the memory target (the planner), drops duplicate plans, the
ones over the target and those equal to a preset, and asks a worker for the proxy scores
(:mod:`tuner.quality.proxy`: the attention-output error of the kept, quantized cache replayed on
recorded full-cache K/V; Spearman ρ 0.97 with held-out PSNR over 65 policies, 0.81–0.91 at equal
memory, experiments/search/proxy_rank.md) of those candidates *and* of the fitted presets. It enqueues
every preset the space can express and the best ``--proxy-top`` candidates, best score first.

Why the order matters: a trial completes only after the top rung's images, and the search's incumbent
(what it would export if stopped) is the best completed trial; under successive halving the early
trials also set the bar the later ones are pruned against. The published 16-bit presets are the
weakest policies at a tight memory target, so running them first spent the first hundreds of images on
them. They are still all evaluated, and all compared in the final round.

Without the proxy (``--proxy-candidates 0``, no memory target, or the scoring failed) the presets are
enqueued in their listed order. Only searches fitted to a memory target are ranked (the proxy ranks
policies of equal memory).
"""
from __future__ import annotations

import math
import time
from typing import Any

from tuner.search import trials as T

A_PRESCREENED = "proxy_prescreened"  # study attribute: pre-screening ran (once per study)
A_PROXY_SCORE = "proxy_score"  # trial attribute of an enqueued candidate or preset
PROXY_TASK_ID = -1  # the pool request id (no evaluation uses negative ids)
PROXY_TIMEOUT_S = 600.0


def candidates(rt: Any, n: int, seed: int,
               exclude: set[str] = frozenset()) -> list[tuple[dict[str, Any], Any]]:
    """Up to ``n`` random points of the space as ``(trial params, planned)``, fitted, distinct plans that
    fit the target and are not in ``exclude`` (plan keys)."""
    import optuna

    sampler = optuna.samplers.RandomSampler(seed=seed)
    scratch = optuna.create_study(sampler=sampler)  # in memory: nothing of it is stored
    out, seen = [], set(exclude)
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


def _planned_presets(rt: Any) -> list[Any]:
    """The fitted plan of every warm start (None where it cannot be planned)."""
    out = []
    for w in rt.warm_starts:
        try:
            out.append(rt.planner.plan(w.preset.family, w.preset.params))
        except (ValueError, KeyError, TypeError):
            out.append(None)
    return out


def _proxy_scores(rt: Any, plans: list[Any]) -> tuple[list[float] | None, str | None]:
    """Proxy scores of ``plans`` from a worker (no image generated), or (None, why it failed)."""
    rt.pool.submit({"task_id": PROXY_TASK_ID, "proxy": [{"family": p.family, "params": p.params}
                                                       for p in plans]})
    outcome = None
    deadline = time.monotonic() + PROXY_TIMEOUT_S
    while outcome is None and time.monotonic() < deadline:
        outcome = next(iter(rt.pool.poll(0.25)), None)
    if outcome is None or outcome.error is not None:
        rt.pool.cancel_all()
        return None, "timed out" if outcome is None else str(outcome.error)
    return [float(s) for s in outcome.result["scores"]], None


def warm_start(rt: Any, n_candidates: int, top: int) -> str | None:
    """Enqueue the warm starts (presets, proxy candidates) once per study; returns a one-line summary,
    or None when nothing was ranked."""
    from tuner.search.study import A_PRESETS_DONE, enqueue_warm_starts

    cfg, study = rt.cfg, rt.study
    presets_due = not study.user_attrs.get(A_PRESETS_DONE)
    if (n_candidates <= 0 or top <= 0 or not cfg.fits_to_target or study.user_attrs.get(A_PRESCREENED)):
        enqueue_warm_starts(study, rt.warm_starts)
        return None
    t0 = time.monotonic()
    preset_plans = _planned_presets(rt) if presets_due else []
    scored_presets = [i for i, p in enumerate(preset_plans) if p is not None and p.fits]
    cands = candidates(rt, n_candidates, cfg.seed, {preset_plans[i].key for i in scored_presets})
    study.set_user_attr(A_PRESCREENED, True)
    plans = [preset_plans[i] for i in scored_presets] + [p for _, p in cands]
    if not plans:
        enqueue_warm_starts(study, rt.warm_starts)
        return "proxy pre-screen: no candidate fits the target"
    scores, why = _proxy_scores(rt, plans)
    if scores is None:
        enqueue_warm_starts(study, rt.warm_starts)
        return f"proxy pre-screen skipped: {why}"
    preset_score = dict(zip(scored_presets, scores[:len(scored_presets)]))
    cand_scores = scores[len(scored_presets):]
    best = sorted(zip(cand_scores, range(len(cands))))[:top]
    # one queue, best score first; presets that could not be scored (over the target) go last
    queue = [(preset_score.get(i, math.inf), 0, i) for i in range(len(rt.warm_starts))] if presets_due else []
    queue += [(score, 1, i) for score, i in best]
    queue.sort(key=lambda q: (q[0], q[1], q[2]))
    for score, kind, i in queue:
        extra = {} if math.isinf(score) else {A_PROXY_SCORE: score}
        if kind == 0:
            w = rt.warm_starts[i]
            study.enqueue_trial(w.params, user_attrs={**w.attrs, **extra})
        else:
            params, planned = cands[i]
            study.enqueue_trial(params, user_attrs={**extra, T.A_FIXED: {"family": planned.family,
                                                                         "params": planned.params}})
    if presets_due:
        study.set_user_attr(A_PRESETS_DONE, True)
    finite = [s for s, _, _ in queue if not math.isinf(s)]
    return (f"proxy pre-screen: scored {len(plans)} distinct policies ({len(scored_presets)} presets, "
            f"{len(cands)} random candidates) without generating an image in {time.monotonic() - t0:.1f} s; "
            f"enqueued {len(queue)} warm starts ({len(best)} candidates), best score first "
            f"({finite[0]:.4f} … {finite[-1]:.4f})")
