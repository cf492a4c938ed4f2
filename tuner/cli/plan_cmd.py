"""``tuner plan``: memory of a policy before any image is generated (no weights, no GPU needed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("plan", help="Memory of a policy (file or family + params): bytes per image, fraction of the "
                             "full 16-bit cache, per-scale resident curve, max batch for a GPU. "
                             "Quantized storage: --param kv_format=int8 (or int4).")(plan)


@user_errors
def plan(
    model: str = typer.Option("tiny", "--model", help="Named model: tiny, d16, d20, d24, d30, d36, "
                                                      "infinity-test, infinity-2b, infinity-8b (1024px 1:1; "
                                                      "--aspect for the other official ratios)."),
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    sides: Optional[str] = mo.SidesOpt,
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy file (JSON)."),
    family: Optional[str] = typer.Option(None, "--family", help="Policy family: full, window, "
                                                                "sink_window, ams, scalekv, budgets."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Family hyperparameter name=value "
                                              "(repeatable)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration JSON (from tuner "
                                              "calibrate); without it ams/scalekv plan with placeholder "
                                              "layer roles."),
    dtype: str = typer.Option("fp16", "--dtype", help="Compute dtype of unquantized K/V: fp32, fp16 or bf16 "
                                                      "(the fraction always counts them as 16-bit)."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU memory (e.g. 80GiB) to size the "
                                          "max batch."),
    heatmap: Optional[str] = typer.Option(None, "--heatmap", help="Write the budget heatmap PNG here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    from tuner.memory import max_batch, memory_report, plot_budget_heatmap
    from tuner.paths import ensure_parent
    from tuner.policies.base import PolicySpec

    cfg, gpu_bytes = _check_flags(model, policy, family, param, calibration, dtype, gpu_mem, heatmap)
    cfg = mo.schedule_config(cfg, sides, aspect, scales)
    geometry = cfg.geometry
    pol, cal, note = _load_policy(cfg, policy, family, param, calibration)
    try:
        report = memory_report(pol, cfg, dtype=dtype, spec=PolicySpec(geometry, cfg.name, cal))
    except ValueError as exc:
        raise UserError(f"policy does not fit {cfg.name}: {exc}") from None
    estimate = max_batch(report, cfg, gpu_bytes, dtype) if gpu_bytes is not None else None
    if heatmap is not None:
        plot_budget_heatmap(report.plan, ensure_parent(heatmap, "--heatmap"),
                            title=f"{cfg.name} {pol.family}")
    _print_report(cfg, pol, report, estimate, dtype, note, as_json)


def _check_flags(model: str, policy: Optional[str], family: Optional[str], param: Optional[List[str]],
                 calibration: Optional[str], dtype: str, gpu_mem: Optional[str], heatmap: Optional[str]):
    """Validate the flags in the order the user reads them; returns ``(model config, GPU bytes or None)``."""
    from tuner.mem_target import parse_size
    from tuner.model.config import model_config
    from tuner.options import DTYPE_NAMES, check_choice
    from tuner.paths import IMAGE_SUFFIXES, check_writable_file

    check_choice(dtype, DTYPE_NAMES, "--dtype")
    if heatmap is not None:
        check_writable_file(heatmap, "--heatmap", IMAGE_SUFFIXES)
    gpu_bytes = None
    if gpu_mem is not None:
        try:
            gpu_bytes = parse_size(gpu_mem)
        except UserError as exc:
            raise UserError(f"--gpu-mem {exc}") from None
    try:
        cfg = model_config(model)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; pass --model with one of them") from None
    if (policy is None) == (family is None):
        raise UserError("pass exactly one of --policy FILE or --family NAME [--param k=v ...]")
    if calibration is not None and not Path(calibration).is_file():
        raise UserError(f"--calibration {calibration}: no such file; pass the calibration.json that "
                        f"`tuner calibrate` wrote (or leave it out to plan with placeholder layer roles)")
    if policy is not None and (param or calibration):
        raise UserError("--param and --calibration go with --family; a policy file holds its own parameters "
                        "and calibration (drop them, or plan --family NAME instead)")
    return cfg, gpu_bytes


def _load_policy(cfg, policy: Optional[str], family: Optional[str], param: Optional[List[str]],
                 calibration: Optional[str]):
    """The policy and its calibration, from a file or from the family flags; returns ``(policy, cal, note)``.

    ``note`` says when placeholder layer roles stand in for a missing ``--calibration`` (else "").
    """
    from tuner.cli.policy_opts import placeholder_calibration, policy_from_flags

    note = ""
    if policy is not None:
        from tuner.policy_file import load_policy_file

        pol, info = load_policy_file(policy, cfg)
        cal = info.calibration
    else:
        pol = policy_from_flags(family, param)
        cal = None
        if calibration:
            from tuner.calibration import Calibration

            try:
                cal = Calibration.load(calibration)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read calibration {calibration}: {exc}; "
                                "rerun tuner calibrate") from None
        elif pol.needs_calibration:
            cal = placeholder_calibration(cfg)
            note = "layer roles: placeholder (no --calibration); memory figures are exact, the roles are not"
            if pol.needs_head_calibration:
                note = ("head statistics: placeholder (no --calibration); which heads keep what is made up"
                        + (", and so is heatkv's memory (it keeps whole scales by calibrated mass)"
                           if pol.family == "heatkv" else "; memory figures are exact"))
    return pol, cal, note


def _print_report(cfg, pol, report, estimate, dtype: str, note: str, as_json: bool) -> None:
    """Echo the memory report: JSON with ``--json``, else the markdown table (and the note, if any)."""
    from tuner.memory import format_plan_table
    from tuner.memory_conventions import convention_figures

    if as_json:
        out = {"model": cfg.name, "family": pol.family, "params": pol.params(), "dtype": dtype,
               "kv_bytes_per_image": report.kv_bytes_per_image,
               "full_kv_bytes_per_image": report.full_kv_bytes_per_image, "fraction": report.fraction,
               "resident_bytes_per_scale": list(report.resident_bytes_per_scale),
               "capacities": list(report.capacities),
               "kv_formats": list(report.plan.layer_formats(report.geometry.num_layers)),
               "scalekv_convention": convention_figures(report),
               "note": note or None}
        if estimate is not None:
            out["max_batch"] = estimate.batch
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(format_plan_table(report, estimate) + (f"\n{note}" if note else ""))
