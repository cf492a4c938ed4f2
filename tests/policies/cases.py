"""The policy matrix every family must pass (kvpress-style data table): easy → aggressive params.

``calibrated``: the case plans with (synthetic) calibration statistics. ``keeps_all``: every layer
keeps every token (its images must be bit-identical to the full cache).
"""
from __future__ import annotations

CASES: dict[str, list[dict]] = {
    "full": [{"params": {}, "keeps_all": True}],
    "window": [
        {"params": {"window": 99}, "keeps_all": True},
        {"params": {"window": 2}},
        {"params": {"window": 1, "max_tokens": 7}},
        {"params": {"window": 1, "max_tokens": 1}},
    ],
    "sink_window": [
        {"params": {"sink_scales": 99, "window": 1}, "keeps_all": True},
        {"params": {"sink_scales": 2, "window": 2}},
        {"params": {"sink_scales": 1, "window": 99, "max_tokens": 9}},
        {"params": {"sink_scales": 3, "window": 1, "max_tokens": 2}},
    ],
    "ams": [
        {"params": {"window": 99, "window_demanding": 99}, "keeps_all": True},
        {"params": {}, "calibrated": True},
        {"params": {"n_condensed": 1, "window": 1, "window_demanding": 3, "theta": -0.7}, "calibrated": True},
        {"params": {"n_condensed": 2, "window": 0, "window_demanding": 1, "theta_quantile": 0.5, "c_min": 4,
                    "c_max": 12}, "calibrated": True},
    ],
    "scalekv": [
        {"params": {"budget_fraction": 1.0}, "keeps_all": True, "calibrated": True},
        {"params": {"budget_fraction": 0.3}, "calibrated": True},
        {"params": {"budget_fraction": 0.2, "n_drafters": 3, "window_size": 4}, "calibrated": True},
        {"params": {"budget_fraction": 0.05, "drafter_fraction": 0.5, "drafter_budget": 0.5, "pool_kernel": 0},
         "calibrated": True},
        {"params": {"budget_fraction": 0.1, "n_drafters": 0}},
    ],
    "budgets": [
        {"params": {"scale_curve": [1.0] * 9}, "keeps_all": True, "curve": True},
        {"params": {"scale_curve": [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2], "rule": "recent"}, "curve": True},
        {"params": {"scale_curve": [1.0, 1.0, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1], "layer_weights": "ramp",
                    "rule": "sink_recent", "sink_scales": 2}, "curve": True},
        {"params": {"scale_curve": [0.5] * 9, "layer_weights": "ramp", "rule": "scores", "window_size": 9},
         "curve": True},
        {"params": {"scale_curve": [1.0] * 9, "max_tokens": 12, "layer_weights": "ramp", "rule": "sink_recent",
                    "sink_scales": 1}, "curve": True},
        {"params": {"scale_curve": [1.0] * 9, "max_tokens": 3, "rule": "scores", "window_size": 4}, "curve": True},
    ],
}


def concrete_params(case: dict, num_layers: int, num_scales: int) -> dict:
    """Fit shape-dependent params (curves, layer weights) to a geometry."""
    params = dict(case["params"])
    if "scale_curve" in params:
        curve = list(params["scale_curve"])
        params["scale_curve"] = (curve + [curve[-1]] * num_scales)[:num_scales - 1]
    if params.get("layer_weights") == "ramp":
        params["layer_weights"] = [0.5 + i for i in range(num_layers)]
    return params


def case_ids() -> list[tuple[str, int]]:
    return [(family, i) for family, cases in CASES.items() for i in range(len(cases))]
