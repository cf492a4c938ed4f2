"""``tuner presets``: the paper presets and LLM baselines of one model, written as policy files."""
from __future__ import annotations

from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError
from tuner.options import resolve_device
from tuner.paths import check_writable_dir, writable_dir
from tuner.threads import apply_threads, check_threads


def register(app: typer.Typer) -> None:
    app.command("presets",
                help="Write the paper presets (AMS-KV default, ScaleKV 10%/20%, HACK, HeatKV) and the "
                     "LLM baselines at their memory as policy files for one model (calibrating it if "
                     "needed); with --mem-target, each fitted to that memory by its budget knob.")(presets)


def smallest_preset_memory(model_cfg) -> tuple[str, float, int]:
    """``(preset, fraction, bytes per image)`` of the preset whose budget knob at its minimum uses the
    least memory: the smallest target ``--mem-target`` can fit.

    Planned with placeholder layer roles (:func:`tuner.cli.policy_opts.placeholder_calibration`):
    memory depends only on how many layers get each role, so the figures are exact before the model
    is calibrated.
    """
    from tuner.cli.policy_opts import placeholder_calibration
    from tuner.memory import memory_report
    from tuner.policies.base import PolicySpec
    from tuner.policies.fit import memory_knob
    from tuner.presets import paper_presets

    cal = placeholder_calibration(model_cfg)
    geometry = model_cfg.geometry
    spec = PolicySpec(geometry, model_cfg.name, cal)
    best = None
    for name, policy in paper_presets(model_cfg, cal).items():
        knob = memory_knob(policy, geometry)
        smallest = knob.apply(knob.low) if knob is not None else policy
        try:
            report = memory_report(smallest, model_cfg, spec=spec)
        except ValueError:
            continue
        if best is None or report.kv_bytes_per_image < best[2]:
            best = (name, float(report.fraction), int(report.kv_bytes_per_image))
    return best


def check_target_reachable(model_cfg, target, text: str) -> None:
    """A one-line error when no preset can be fitted to ``target`` (before calibrating the model)."""
    from tuner.cli.policy_opts import placeholder_calibration
    from tuner.presets import fitted_paper_presets

    fitted = fitted_paper_presets(model_cfg, placeholder_calibration(model_cfg), target)
    if all(p is None for p in fitted.values()):
        raise _unreachable(model_cfg, target, text)


def _unreachable(model_cfg, target, text: str) -> UserError:
    name, fraction, nbytes = smallest_preset_memory(model_cfg)
    return UserError(f"--mem-target {text!r}: no preset can fit {target.describe()} on {model_cfg.name}; the "
                     f"smallest achievable is {100 * fraction:.3g}% of the full cache "
                     f"({nbytes / 2**20:.4g} MiB per image, {name}); pass a larger --mem-target")


def preset_policies(loaded, calibration, mem_target: Optional[str]) -> dict:
    """``name -> policy``: :func:`tuner.presets.paper_presets`, optionally fitted to a memory target."""
    from tuner.mem_target import parse_mem_target
    from tuner.presets import fitted_paper_presets, paper_presets

    if mem_target is None:
        return paper_presets(loaded.config, calibration)
    target = parse_mem_target(mem_target)
    fitted = fitted_paper_presets(loaded.config, calibration, target)
    if all(p is None for p in fitted.values()):
        raise _unreachable(loaded.config, target, mem_target)
    for name in [n for n, p in fitted.items() if p is None]:
        typer.echo(f"skipped {name}: it cannot be made to fit {mem_target}", err=True)
    return {n: p for n, p in fitted.items() if p is not None}


@user_errors
def presets(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    prompts: Optional[str] = mo.PromptsOpt,
    mem_target: Optional[str] = typer.Option(None, "--mem-target",
                                             help="Fit each preset to this memory: 15%, "
                                                  "0.15 or 40MiB per image."),
    calibration_samples: int = typer.Option(16, "--calibration-samples",
                                            help="Calibration images when the "
                                                 "model has no cached calibration."),
    out: str = typer.Option(..., "--out", help="Directory for <preset>.json files."),
    device: str = mo.DeviceOpt,
    threads: Optional[int] = mo.ThreadsOpt,
) -> None:
    from tuner.cli.calibrate_cmd import calibration_for
    from tuner.mem_target import parse_mem_target
    from tuner.policy_file import load_policy_file, write_policy_file

    check_threads(threads)
    if calibration_samples <= 0:
        raise UserError(f"--calibration-samples {calibration_samples} must be positive")
    if mem_target is not None and not mem_target.strip():
        raise UserError("--mem-target is empty; use a percentage like 15%, a fraction like 0.15 or 40MiB")
    target = parse_mem_target(mem_target) if mem_target is not None else None
    check_writable_dir(out, "--out")
    mo.check_schedule_options(sides, aspect, scales)
    texts = mo.read_prompts_option(model, prompts)  # the calibration's prompts (Infinity)
    apply_threads(threads)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights,
                                        resolve_device(device), sides=sides, aspect=aspect, scales=scales,
                                        prompts=texts)
    if target is not None:
        check_target_reachable(loaded.config, target, mem_target)
    cal = calibration_for(loaded, calibration_samples)
    policies = preset_policies(loaded, cal, mem_target)
    out_dir = writable_dir(out)
    note = "random weights: for memory checks only, the roles are not the trained model's" if random_weights \
        else None
    for name, policy in policies.items():
        path = out_dir / f"{name.replace('@', '_at_')}.json"
        prov = {"preset": name, "mem_target": mem_target, "note": note}
        written = write_policy_file(path, policy, loaded.config, checkpoint_sha256=loaded.checkpoint_sha256,
                                    calibration=cal, provenance=prov)
        _, info = load_policy_file(written, loaded.config)
        typer.echo(f"{name:>24}: {100 * info.memory['fraction']:6.2f}% of the full cache, "
                   f"{info.memory['kv_bytes_per_image'] / 2**20:.3f} MiB per image -> {written}")
