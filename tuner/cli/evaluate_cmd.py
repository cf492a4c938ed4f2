"""``tuner evaluate``: memory and quality of one policy (file or preset name) vs the full cache."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import DTYPE_NAMES, check_choice, resolve_device, user_errors
from tuner.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("evaluate", help="Paired evaluation of a policy against the full cache on the same labels and "
                                 "seeds: memory fraction, KV bytes, fid_vs_full, delta_fid, PSNR, SSIM, latency.")(
        evaluate)


def resolve_policy(evaluator, name_or_path: str):
    """A policy file path, or a paper preset name (``ams``, ``scalekv_10``, ``window@ams`` ...)."""
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        from tuner.policy_file import load_policy_file

        return load_policy_file(name_or_path, evaluator.loaded.config,
                                checkpoint_sha256=evaluator.loaded.checkpoint_sha256)[0]
    from tuner.policies.full import FullPolicy
    from tuner.presets import paper_presets

    presets = {"full": FullPolicy(), **paper_presets(evaluator.loaded.config, evaluator.calibration())}
    if name_or_path not in presets:
        raise UserError(f"unknown policy {name_or_path!r}: not a file and not a preset "
                        f"({', '.join(presets)})")
    return presets[name_or_path]


@contextmanager
def progress_bar(evaluator, total_images: int, disable: bool):
    """A rich progress bar on stderr over the images generated (full cache, then policy).

    Hooks :attr:`PolicyEvaluator.progress` for the duration of the block; transient, so nothing of it
    stays on the terminal, and never written to stdout.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if disable:
        yield
        return
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task("generating", total=total_images)

        def advance(phase: str, images: int) -> None:
            prog.update(task, advance=images, description=f"generating {phase}")

        evaluator.progress = advance
        try:
            yield
        finally:
            evaluator.progress = None


@user_errors
def evaluate(
    policy: str = typer.Option(..., "--policy", help="Policy file (JSON) or preset name (e.g. ams, scalekv_10)."),
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    samples: int = typer.Option(64, "--samples", help="Images (paired with the full cache)."),
    seed: int = typer.Option(0, "--seed", help="Base seed (batch j uses seed + j)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", envvar="TUNER_INCEPTION_WEIGHTS",
                                                    help="FID Inception weights (pt_inception-2015-12-05) for "
                                                         "ImageNet models."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference batch .npz for fid/delta_fid."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    attention_backend: str = mo.BackendOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (no progress bar: stdout stays pure JSON)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
) -> None:
    from tuner.quality.evaluate import EvalSpec, build_evaluator

    check_choice(dtype, DTYPE_NAMES, "--dtype")
    if samples <= 0:
        raise UserError(f"--samples {samples} must be positive")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be positive")
    if reference is not None and not Path(reference).is_file():
        raise UserError(f"reference batch {reference} not found; pass an existing .npz with --reference")
    ev = build_evaluator(model, weights_dir=weights_dir, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt,
                         device=resolve_device(device), dtype=dtype, backend=attention_backend,
                         inception_weights=inception_weights, reference=reference)
    pol = resolve_policy(ev, policy)
    spec = EvalSpec.balanced(ev.loaded.config.var.num_classes, samples, seed, batch_size=batch_size)
    with progress_bar(ev, 2 * samples, disable=as_json or no_progress):
        metrics = ev.evaluate(pol.family, pol.params(), spec)
    if as_json:
        typer.echo(json.dumps({"model": ev.loaded.config.name, "family": pol.family, "params": pol.params(),
                               **metrics}, indent=2))
        return
    for k, v in metrics.items():
        typer.echo(f"{k:>24}: {v:.6g}")
