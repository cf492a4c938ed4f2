"""``tuner evaluate``: memory and quality of one policy (file or preset name) vs the full cache."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError
from tuner.model.weights_check import check_weights
from tuner.options import BACKENDS, DTYPE_NAMES, check_choice, check_seed, resolve_device
from tuner.threads import apply_threads, check_threads


def register(app: typer.Typer) -> None:
    app.command("evaluate",
                help="Paired evaluation of a policy against the full cache on the same labels and "
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

    if name_or_path == "full":  # needs no calibration
        return FullPolicy()
    presets = {"full": FullPolicy(), **paper_presets(evaluator.loaded.config, evaluator.calibration())}
    if name_or_path not in presets:
        raise UserError(f"unknown policy {name_or_path!r}: not a file and not a preset "
                        f"({', '.join(presets)})")
    return presets[name_or_path]


def preset_names() -> list[str]:
    """Names :func:`resolve_policy` accepts besides files, known without calibrating the model."""
    from tuner.cli.policy_opts import placeholder_calibration
    from tuner.model.config import model_config
    from tuner.presets import paper_presets

    cfg = model_config("tiny")  # the names are the same for every model; placeholder statistics suffice
    return ["full", *paper_presets(cfg, placeholder_calibration(cfg))]


def check_policy_name(name_or_path: str) -> None:
    """Before the model is loaded: a policy file must be a readable, well-formed policy file (whether it
    fits the model is checked once the model is loaded) and a preset name must exist."""
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        from tuner.policy_file import load_policy_file

        load_policy_file(name_or_path)
        return
    names = preset_names()
    if name_or_path not in names:
        raise UserError(f"unknown policy {name_or_path!r}: not a file and not a preset ({', '.join(names)})")


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
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("images"),
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
    policy: str = typer.Option(..., "--policy",
                               help="Policy file (JSON) or preset name (e.g. ams, scalekv_10)."),
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    prompts: Optional[str] = mo.PromptsOpt,
    samples: int = typer.Option(64, "--samples", help="Images (paired with the full cache; Infinity: "
                                "cycling through the prompts)."),
    seed: int = typer.Option(0, "--seed", help="Base seed (batch j uses seed + j)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights",
                                                    envvar="TUNER_INCEPTION_WEIGHTS",
                                                    help="FID Inception weights (pt_inception-2015-12-05) "
                                                         "for ImageNet models."),
    reference: Optional[str] = typer.Option(None, "--reference",
                                            help="Reference batch .npz for fid/delta_fid."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    attention_backend: str = mo.BackendOpt,
    as_json: bool = typer.Option(False, "--json",
                                 help="Print JSON (no progress bar: stdout stays pure JSON)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
    threads: Optional[int] = mo.ThreadsOpt,
) -> None:
    check_threads(threads)
    check_choice(dtype, DTYPE_NAMES, "--dtype")
    check_choice(attention_backend, BACKENDS, "--attention-backend")
    if samples < 2:
        raise UserError(f"--samples {samples} must be a positive count of at least 2 (the Fréchet distance "
                        f"needs two images)")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be positive")
    check_seed(seed)
    if reference is not None and not Path(reference).is_file():
        raise UserError(f"reference batch {reference} not found; pass an existing .npz with --reference")
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise UserError(f"Inception weights {inception_weights} not found; pass the pt_inception-2015-12-05 "
                        f"file with --inception-weights (or TUNER_INCEPTION_WEIGHTS)")
    check_policy_name(policy)
    mo.check_schedule_options(sides, aspect, scales)
    mo.read_prompts_option(model, prompts)
    check_weights(model, var_ckpt, vae_ckpt, weights_dir, random_weights_flag=True,
                  random_weights=random_weights)
    dev = resolve_device(device)
    apply_threads(threads)
    from tuner.quality.evaluate import EvalSpec, build_evaluator

    ev = build_evaluator(model, weights_dir=weights_dir, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt,
                         device=dev, dtype=dtype, backend=attention_backend,
                         inception_weights=inception_weights, reference=reference,
                         random_weights=random_weights, sides=sides, aspect=aspect, scales=scales,
                         prompts=prompts)
    pol = resolve_policy(ev, policy)
    spec = EvalSpec.balanced(ev.loaded.num_conditions, samples, seed, batch_size=batch_size,
                            **ev.loaded.config.sampling.as_kwargs())
    with progress_bar(ev, 2 * samples, disable=as_json or no_progress):
        metrics = ev.evaluate(pol.family, pol.params(), spec)
    if as_json:
        typer.echo(json.dumps({"model": ev.loaded.config.name, "family": pol.family, "params": pol.params(),
                               **metrics}, indent=2))
        return
    for k, v in metrics.items():
        typer.echo(f"{k:>24}: {v:.6g}")
    if ev.loaded.note:
        typer.echo(f"note: {ev.loaded.note}")
