"""Paper presets for a model, and the LLM baselines at exactly their memory.

The search enqueues these first (docs/design.md, Search) and reports them next to its winner. Presets:

- ``ams``: AMS-KV as reconstructed from the paper: the 2 coarsest scales condensed, a
  local window of 1 recent scale (2 for the quarter of the layers with the lowest inter-scale key
  similarity, ``theta_quantile = 0.25``).
- ``scalekv_10`` / ``scalekv_20``: ScaleKV at 10% / 20% of the tokens cached before the last scale,
  1/16 of the (layer, scale) pairs drafters keeping 99% of their candidates, 16 window queries,
  max-pool 5.
- ``hack``: HACK's head split at its defaults (:class:`~tuner.policies.hack.HACKPolicy`: half the
  heads contextual, a mean budget of 30% of the tokens cached before the last scale, contextual heads
  at 0.2× the structural budget, 2 sink scales, 32 sampled queries).
- ``heatkv``: HeatKV's static (layer, head, source-scale) schedule keeping half of the prunable atoms
  by S-CAS, the initial scales within 1% of the cache protected
  (:class:`~tuner.policies.heatkv.HeatKVPolicy`).
- For each of those ``P``: ``window@P`` (token-level sliding window) and ``sink_window@P``
  (StreamingLLM: the 2 coarsest scales as sinks + the most recent tokens), with the per-layer token
  cap solved so their KV bytes are the largest not above ``P``'s (at most ``num_layers - 1`` tokens
  of one layer below it).

AMS-KV, ScaleKV, HACK and HeatKV plan from calibration statistics, so their memory depends on them: without
``calibration`` :func:`paper_presets` raises ``UserError`` (it never falls back to made-up
statistics).
"""
from __future__ import annotations

from typing import Any

from tuner.errors import UserError
from tuner.policies.ams import AMSPolicy
from tuner.policies.base import CacheGeometry, KVPolicy, PolicySpec
from tuner.policies.hack import HACKPolicy
from tuner.policies.heatkv import HeatKVPolicy
from tuner.policies.scalekv import ScaleKVPolicy
from tuner.policies.sink_window import SinkWindowPolicy
from tuner.policies.window import WindowPolicy

BASELINE_SINK_SCALES = 2


def method_presets() -> dict[str, KVPolicy]:
    """The paper methods' default hyperparameters (model-independent)."""
    return {
        "ams": AMSPolicy(n_condensed=2, window=1, window_demanding=2, theta_quantile=0.25),
        "scalekv_10": ScaleKVPolicy(budget_fraction=0.10),
        "scalekv_20": ScaleKVPolicy(budget_fraction=0.20),
        "hack": HACKPolicy(),
        "heatkv": HeatKVPolicy(),
    }


def matched_token_cap(policy: KVPolicy, spec: PolicySpec) -> int:
    """Per-layer token cap ``c`` of a uniform baseline whose KV bytes are the largest ``<=`` the policy's.

    Uniform baselines hold ``num_layers · c`` tokens plus the same workspace, so
    ``c = floor(Σ_l C[l] / num_layers)`` (at least 1); per-head plans count ``C[l]`` as the mean of
    the layer's head capacities (``Σ_h C[l][h] / heads``, what it stores).
    """
    plan = policy.plan(spec)
    g = spec.geometry
    total = g.seq_len * g.num_layers if plan.full else \
        sum(plan.capacity_vectors(layer, g.num_heads) for layer in range(g.num_layers)) // g.num_heads
    return max(1, total // g.num_layers)


def matched_baselines(policy: KVPolicy, spec: PolicySpec) -> dict[str, KVPolicy]:
    """``window`` and ``sink_window`` at the same memory as ``policy`` (see :func:`matched_token_cap`)."""
    g = spec.geometry
    cap = matched_token_cap(policy, spec)
    return {"window": WindowPolicy(window=g.num_scales, max_tokens=cap),
            "sink_window": SinkWindowPolicy(sink_scales=min(BASELINE_SINK_SCALES, g.num_scales),
                                            window=g.num_scales, max_tokens=cap)}


def budgets_form(policy: KVPolicy, geometry: CacheGeometry) -> KVPolicy | None:
    """The joint ``budgets`` family's exact form of a token-cap baseline, or None.

    ``window`` / ``sink_window`` spanning every scale with a cap ``c`` keep ``min(T_s, c)`` tokens
    after scale ``s``: the budgets cap form (curve all ones, ``max_tokens = c``, equal layer
    weights) with the ``recent`` / ``sink_recent`` rule plans the same rows and selects the same
    tokens. The search enqueues these
    forms so that its joint space starts from the baselines as well as from the papers' presets.
    """
    from tuner.policies.budgets import BudgetsPolicy

    cap = getattr(policy, "max_tokens", None)
    if policy.family not in ("window", "sink_window") or cap is None or policy.window < geometry.num_scales:
        return None
    ones = (1.0,) * (geometry.num_scales - 1)
    fmt = policy.kv_format  # the same storage: the form plans the same bytes
    if policy.family == "window":
        return BudgetsPolicy(scale_curve=ones, max_tokens=cap, rule="recent", kv_format=fmt)
    return BudgetsPolicy(scale_curve=ones, max_tokens=cap, rule="sink_recent", sink_scales=policy.sink_scales,
                         kv_format=fmt)


def paper_presets(model_cfg: Any, calibration: Any = None) -> dict[str, KVPolicy]:
    """Presets by name (insertion order: each method followed by its matched baselines).

    Parameters
    ----------
    model_cfg: ``ModelConfig`` (or ``VARConfig`` / :class:`CacheGeometry`).
    calibration: :class:`tuner.calibration.Calibration` of that model; required (``UserError``).
    """
    from tuner.memory import as_geometry

    geometry: CacheGeometry = as_geometry(model_cfg)
    name = getattr(model_cfg, "name", "")
    if calibration is None:
        raise UserError(f"the paper presets of {name or 'this model'} need its calibration statistics "
                        f"(AMS-KV key similarity, ScaleKV ASI); run `tuner calibrate` first or pass "
                        f"--no-presets")
    try:
        calibration.check_geometry(geometry)
    except ValueError as exc:
        raise UserError(f"calibration does not fit {name or 'this model'}: {exc}; "
                        f"recalibrate this model") from None
    spec = PolicySpec(geometry, name, calibration)
    out: dict[str, KVPolicy] = {}
    for preset, policy in method_presets().items():
        out[preset] = policy
        for base, matched in matched_baselines(policy, spec).items():
            out[f"{base}@{preset}"] = matched
    return out


def fitted_paper_presets(model_cfg: Any, calibration: Any, target: Any) -> dict[str, KVPolicy | None]:
    """:func:`paper_presets` with each budget knob fitted to ``target`` (:mod:`tuner.policies.fit`).

    ``target``: a :class:`tuner.mem_target.MemTarget` (``parse_mem_target("15%")``). Values are None
    for presets that cannot fit; a fitted policy equal to an earlier one (the baselines of different
    methods fit to the same policy) is left out. Insertion order follows :func:`paper_presets`.
    """
    from tuner.memory import as_geometry, memory_report
    from tuner.policies.fit import fit_to_memory

    geometry = as_geometry(model_cfg)
    spec = PolicySpec(geometry, getattr(model_cfg, "name", ""), calibration)

    def fits(policy: KVPolicy) -> bool:
        report = memory_report(policy, model_cfg, spec=spec)
        return target.fits(report.fraction, report.kv_bytes_per_image)

    out: dict[str, KVPolicy | None] = {}
    for name, policy in paper_presets(model_cfg, calibration).items():
        fitted = fit_to_memory(policy, geometry, fits)
        if fitted is None or fitted not in out.values():
            out[name] = fitted
    return out

