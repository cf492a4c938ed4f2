"""``tuner presets``: the paper presets and LLM baselines of one model, written as policy files."""
from __future__ import annotations

from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import resolve_device, user_errors, writable_dir
from tuner.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("presets", help="Write the paper presets (AMS-KV default, ScaleKV 10%/20%) and the LLM baselines "
                                "at their memory as policy files for one model (calibrating it if needed); with "
                                "--mem-target, each fitted to that memory by its budget knob.")(presets)


def preset_policies(loaded, calibration, mem_target: Optional[str]) -> dict:
    """``name -> policy``: :func:`tuner.presets.paper_presets`, optionally fitted to a memory target."""
    from tuner.mem_target import parse_mem_target
    from tuner.presets import fitted_paper_presets, paper_presets

    if mem_target is None:
        return paper_presets(loaded.config, calibration)
    fitted = fitted_paper_presets(loaded.config, calibration, parse_mem_target(mem_target))
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
    mem_target: Optional[str] = typer.Option(None, "--mem-target", help="Fit each preset to this memory: 15%, "
                                                                         "0.15 or 40MiB per image."),
    calibration_samples: int = typer.Option(16, "--calibration-samples", help="Calibration images when the "
                                                                              "model has no cached calibration."),
    out: str = typer.Option(..., "--out", help="Directory for <preset>.json files."),
    device: str = mo.DeviceOpt,
) -> None:
    from tuner.cli.calibrate_cmd import calibration_for
    from tuner.policy_file import load_policy_file, write_policy_file

    if calibration_samples <= 0:
        raise UserError(f"--calibration-samples {calibration_samples} must be positive")
    out_dir = writable_dir(out)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights, resolve_device(device))
    cal = calibration_for(loaded, calibration_samples)
    policies = preset_policies(loaded, cal, mem_target)
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
