"""``tuner calibrate``: per-layer/scale statistics the ams and scalekv policies plan with."""
from __future__ import annotations

from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError
from tuner.options import check_seed, resolve_device
from tuner.paths import check_writable_dir, writable_dir
from tuner.threads import apply_threads, check_threads


def register(app: typer.Typer) -> None:
    app.command("calibrate",
                help="Compute (and cache) inter-scale key similarity, ScaleKV's ASI and attention "
                     "density from full-cache generations; writes heatmaps and a table.")(calibrate)


def calibration_for(loaded, samples: int = 16, seed: int = 0, recompute: bool = False, quiet: bool = False):
    """Cached calibration of a loaded model, computed when missing with its progress on stderr (per
    scale of each batch: a bar on a terminal, plain lines elsewhere; :mod:`tuner.cli.progress`).

    Shared by ``tuner calibrate`` and ``tuner presets``.
    """
    from tuner.calibration import CalibrationSpec, load_or_compute_calibration
    from tuner.cli.progress import step_progress

    from tuner.model.runner import cache_key

    key = cache_key(loaded)  # as the evaluator keys it (tuner.quality.evaluate.PolicyEvaluator.model_hash)
    with step_progress(f"calibrating {loaded.config.name}", samples, "images", quiet=quiet) as update:
        return load_or_compute_calibration(
            loaded, checkpoint_sha256=key,
            spec=CalibrationSpec(samples=samples, seed=seed, **loaded.config.sampling.as_kwargs()),
            recompute=recompute,
            progress=lambda done, total: update(done), progress_per_scale=True)


@user_errors
def calibrate(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    prompts: Optional[str] = mo.PromptsOpt,
    samples: int = typer.Option(16, "--samples", help="Calibration images (Infinity: cycling through the "
                                "prompts)."),
    seed: int = typer.Option(0, "--seed", help="Calibration seed."),
    out: str = typer.Option("calibration", "--out",
                            help="Directory for calibration.json, heatmaps and table."),
    recompute: bool = typer.Option(False, "--recompute", help="Ignore the on-disk cache."),
    device: str = mo.DeviceOpt,
    threads: Optional[int] = mo.ThreadsOpt,
) -> None:
    from tuner.calibration_report import calibration_markdown, plot_calibration

    check_threads(threads)
    if samples <= 0:
        raise UserError(f"--samples {samples} must be positive")
    check_seed(seed)
    check_writable_dir(out, "--out")
    mo.check_schedule_options(sides, aspect, scales)
    texts = mo.read_prompts_option(model, prompts)
    apply_threads(threads)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights,
                                        resolve_device(device), sides=sides, aspect=aspect, scales=scales,
                                        prompts=texts)
    cal = calibration_for(loaded, samples, seed, recompute)
    out_dir = writable_dir(out)  # only now: bad input leaves no directory behind
    cal.save(out_dir / "calibration.json")
    (out_dir / "calibration.md").write_text(calibration_markdown(cal))
    pngs = plot_calibration(cal, out_dir)
    typer.echo(calibration_markdown(cal))
    typer.echo(f"wrote {out_dir}/calibration.json, calibration.md and {len(pngs)} heatmaps")
