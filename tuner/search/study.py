"""Creating, resuming and seeding the Optuna study (the driver is its only writer).

- :func:`make_sampler`: TPE (default), NSGA-II, GP or random, always seeded.
- :func:`open_study`: create or resume by name; a study created with other settings (target, metric,
  space, model) is refused instead of being silently mixed.
- :func:`recover_stale_trials`: RUNNING trials of a driver that no longer runs (killed) are marked
  FAIL and re-queued with the same parameters, so a resume loses nothing and evaluates nothing twice
  (finished evaluations come from the cache).
- :func:`preset_warm_starts`, :func:`enqueue_warm_starts`: the paper presets first (warm starts), once
  per study (ordered by the zero-generation proxy when it runs, :mod:`tuner.search.prescreen`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from tuner.errors import UserError
from tuner.search import trials as T

A_IDENTITY, A_PRESETS_DONE, A_MLFLOW_RUN, A_SPACE_DIGEST = "tuner_identity", "presets_enqueued", \
    "mlflow_run_id", "space_digest"
A_EXPORTED = "exported_policy"  # the last export: trial number (None for a preset), preset, family, path


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    params: dict[str, Any]


def make_sampler(name: str, seed: int, n_trials: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # multivariate+group model the conditional (per-family) parameters jointly; constant_liar
            # keeps parallel workers from all proposing the same point.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                              n_startup_trials=min(10, max(2, n_trials // 4)))
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 4)))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"--sampler {name!r} is not one of tpe, nsga2, gp, random")


def make_pruner(fidelity: Any):
    """Successive halving over the screening rungs (:mod:`tuner.search.fidelity`), or no pruning.

    Asynchronous (ASHA): a trial reaching a rung goes on if its intermediate value is in the best
    1/η of those that reached that rung so far; the rungs sit at ``min_samples·η^k`` images, the steps
    the driver reports at. The decision depends only on stored intermediate values, so it survives a
    resume.
    """
    import optuna

    if not fidelity.pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=fidelity.rungs[0],
                                                  reduction_factor=fidelity.reduction_factor,
                                                  min_early_stopping_rate=0, bootstrap_count=0)


def open_study(storage: Any, name: str, directions: list[str], identity: dict[str, Any], sampler: Any,
               pruner: Any = None):
    """Resume ``name`` if it exists (settings must match), else create it."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        if A_IDENTITY not in study.user_attrs:
            study.set_user_attr(A_IDENTITY, identity)
        return study, False
    old = study.user_attrs.get(A_IDENTITY)
    if old is None:
        raise UserError(f"study {name!r} exists in this storage but was not created by tuner search; "
                        f"pass another --study-name")
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        what = ", ".join(f"{k}={old.get(k)!r} (now {identity.get(k)!r})" for k in diff)
        raise UserError(f"study {name!r} was created with {what}; re-run with the same settings to resume, "
                        f"or pass a new --study-name")
    return study, True


def recover_stale_trials(study: Any, live_sessions: set[str], own_session: str) -> list[int]:
    """Fail and re-queue RUNNING trials whose driver is gone; returns their numbers."""
    from optuna.trial import TrialState

    others_alive = bool(live_sessions - {own_session})
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        session = t.user_attrs.get(T.A_SESSION)
        if session in live_sessions or (session is None and others_alive):
            continue
        study._storage.set_trial_user_attr(t._trial_id, T.A_INTERRUPTED, "driver gone")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        requeue(study, t.params, t.user_attrs, t.number)
        recovered.append(t.number)
    return recovered


def requeue(study: Any, params: dict[str, Any], user_attrs: dict[str, Any], number: int) -> None:
    """Enqueue the same point again (evaluated first on the next ask)."""
    attrs = {T.A_RETRY_OF: number}
    for key in (T.A_FIXED, T.A_PRESET):
        if user_attrs.get(key) is not None:
            attrs[key] = user_attrs[key]
    if T.A_FIXED not in attrs and user_attrs.get(T.A_FAMILY):
        attrs[T.A_FIXED] = {"family": user_attrs[T.A_FAMILY], "params": user_attrs.get(T.A_POLICY) or {}}
    study.enqueue_trial(dict(params), user_attrs=attrs)


def load_presets(model_cfg: Any, calibration: Any = None) -> list[Preset]:
    """The paper presets and baselines of :func:`tuner.presets.paper_presets`, as plain records
    (they plan from the worker's calibration; without one it raises a UserError naming --no-presets)."""
    from tuner.presets import paper_presets

    raw = paper_presets(model_cfg, calibration)
    items = raw.items() if isinstance(raw, dict) else ((getattr(p, "name", None), p) for p in raw)
    out = []
    for name, p in items:
        if isinstance(p, tuple) and len(p) == 2:
            family, params = p
        elif hasattr(p, "policy"):
            family, params = p.policy.family, p.policy.params()
        elif callable(getattr(p, "params", None)):
            family, params = p.family, p.params()
        else:
            family, params = p.family, dict(p.params)
        params = dict(params)
        params.setdefault("kv_format", "compute")  # explicit, so a space that searches it can enqueue it
        out.append(Preset(str(name or family), family, params))
    return out


def distinct_presets(presets: list[Preset], planner: Any) -> tuple[list[Preset], list[tuple[str, str]]]:
    """The presets whose planned policy (fitted to the target, when there is one) differs from every
    earlier one's, and ``(dropped, same as)`` name pairs: the baselines matched to different methods
    often fit to one policy, and a duplicate would cost a trial and a table row for nothing."""
    kept, merged, first = [], [], {}
    for p in presets:
        try:
            key = planner.plan(p.family, p.params).key
        except ValueError:  # cannot be planned here: kept, so the final round reports why
            kept.append(p)
            continue
        if key in first:
            merged.append((p.name, first[key]))
            continue
        first[key] = p.name
        kept.append(p)
    return kept, merged


QUANTIZED_PRESET_FORMATS = ("int8", "int4")


def quantized_presets(presets: list[Preset],
                      formats: tuple[str, ...] = QUANTIZED_PRESET_FORMATS) -> list[Preset]:
    """``<name> + int8`` / ``<name> + int4``: each 16-bit preset with its kept tokens stored quantized.

    The paper presets themselves stay as published (16-bit); these rows show what the search adds
    over "just quantize the preset" (under ``--mem-target`` their knob is refitted to the target
    like every candidate's, so a quantized preset keeps more tokens in the same memory).
    """
    return [Preset(f"{p.name} + {fmt}", p.family, {**p.params, "kv_format": fmt})
            for p in presets if p.params.get("kv_format", "compute") == "compute" for fmt in formats]


def budgets_forms(presets: list[Preset], geometry: Any, build: Any = None) -> list[Preset]:
    """``budgets:<name>`` presets for the baselines that have an exact joint-family form (deduplicated).

    ``build(family, params) -> policy`` makes each baseline first (default: as given); the search
    passes its planner so that the form is taken of the baseline *fitted to the memory target* (the
    budgets knob scales a curve, which is not the same as lowering a token cap).
    """
    from tuner.policies.registry import make_policy
    from tuner.presets import budgets_form

    if geometry is None:
        return []
    out, seen = [], set()
    for p in presets:
        try:
            form = budgets_form((build or make_policy)(p.family, p.params), geometry)
        except ValueError:
            continue
        if form is None:
            continue
        # one per baseline kind and storage format: the knob is refitted anyway
        key = (p.family, form.rule, str(form.kv_format))
        if key in seen:
            continue
        seen.add(key)
        out.append(Preset(f"budgets:{p.name}", form.family, {"kv_format": "compute", **form.params()}))
    return out


@dataclass(frozen=True)
class WarmStart:
    """A trial to enqueue before the sampler's own: a preset the space can express."""

    preset: Preset
    params: dict[str, Any]  # its trial parameters in the space

    @property
    def attrs(self) -> dict[str, Any]:
        return {T.A_PRESET: self.preset.name,
                T.A_FIXED: {"family": self.preset.family, "params": self.preset.params}}


def preset_warm_starts(space: Any, presets: list[Preset],
                       extra: list[Preset] = ()) -> tuple[list[WarmStart], list[Preset]]:
    """(warm starts: the presets the space can express, the others).

    Presets outside the space (other families, off-range values) are not trials: they are evaluated
    only for the final comparison table. ``extra`` presets are warm starts when the space can express
    them, and dropped otherwise (see :func:`budgets_forms`).
    """
    inside, outside = [], []
    for p in presets:
        params = space.trial_params(p.family, p.params)
        if params is not None:
            inside.append(WarmStart(p, params))
        else:
            outside.append(p)
    for p in extra:  # e.g. the baselines' budgets forms: enqueued when the space has them, never compared
        params = space.trial_params(p.family, p.params)
        if params is not None:
            inside.append(WarmStart(p, params))
    return inside, outside


def enqueue_warm_starts(study: Any, starts: list[WarmStart], scores: dict[int, float] | None = None) -> None:
    """Enqueue ``starts`` once per study, in the given order, with their proxy score (by index) if any."""
    if study.user_attrs.get(A_PRESETS_DONE):
        return
    for i, w in enumerate(starts):
        extra = {} if scores is None or i not in scores else {"proxy_score": scores[i]}
        study.enqueue_trial(w.params, user_attrs={**w.attrs, **extra})
    study.set_user_attr(A_PRESETS_DONE, True)


def enqueue_presets(study: Any, space: Any, presets: list[Preset],
                    extra: list[Preset] = ()) -> tuple[list[str], list[Preset]]:
    """Enqueue the presets the space can express in their order (once per study); return (enqueued
    names, the others). The search itself orders them by the proxy first (:mod:`tuner.search.prescreen`)."""
    inside, outside = preset_warm_starts(space, presets, extra)
    if study.user_attrs.get(A_PRESETS_DONE):
        return [], outside
    enqueue_warm_starts(study, inside)
    return [w.preset.name for w in inside], outside
