"""``tuner policy show|validate|check``: read policy files, print them, check them against a model or
against committed reference policies (the logic of ``check`` lives in :mod:`tuner.policy_check`)."""
from __future__ import annotations

from typing import List, Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Inspect and check policy files.", no_args_is_help=True)
    sub.command("show", help="Print a policy file as a table (and a budget heatmap PNG on request).")(show)
    sub.command("validate", help="Check a policy file against a model; exit 2 with the reason if it does "
                                 "not fit.")(validate)
    sub.command("check", help="Compare policy files with reference policies (same model and search target): "
                              "memory must not grow and quality, re-evaluated paired on one fixed spec, must "
                              "not drop beyond the tolerances. Exit 1 on a regression, "
                              "2 on bad input.")(check)
    app.add_typer(sub, name="policy")


def _model(name: str):
    from tuner.model.config import model_config

    try:
        return model_config(name)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; pass --model with one of them") from None


@user_errors
def show(path: str = typer.Argument(..., help="Policy file (JSON)."),
         heatmap: Optional[str] = typer.Option(None, "--heatmap",
                                               help="Write the budget heatmap PNG here.")) -> None:
    from tuner.memory import plot_budget_heatmap
    from tuner.paths import IMAGE_SUFFIXES, check_writable_file, ensure_parent
    from tuner.policy_file import describe_policy_file, load_policy_file

    if heatmap is not None:
        check_writable_file(heatmap, "--heatmap", IMAGE_SUFFIXES)
    policy, info = load_policy_file(path)
    if heatmap is not None:
        plot_budget_heatmap(info.plan, ensure_parent(heatmap, "--heatmap"), title=f"{policy.family}")
    typer.echo(describe_policy_file(policy, info))
    if heatmap is not None:
        typer.echo(f"heatmap: {heatmap}")


@user_errors
def validate(path: str = typer.Argument(..., help="Policy file (JSON)."),
             model: str = typer.Option(..., "--model",
                                       help="Model the policy must fit (tiny, d16, ... d36, infinity-*)."),
             aspect: Optional[str] = mo.AspectOpt, scales: Optional[int] = mo.ScalesOpt,
             sides: Optional[str] = mo.SidesOpt) -> None:
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(path, mo.schedule_config(_model(model), sides, aspect, scales))
    typer.echo(f"ok: {path} is a valid {policy.family} policy for {model} "
               f"({100 * info.memory['fraction']:.2f}% of the full cache)")


@user_errors
def check(candidates: List[str] = typer.Argument(..., help="Candidate policy files (JSON)."),
          reference: List[str] = typer.Option(..., "--reference", help="Reference policy directory "
                                              "(its *.json) or file; repeatable."),
          model: Optional[str] = typer.Option(None, "--model", help="Require every file to be for this "
                                              "model."),
          weights_dir: Optional[str] = typer.Option(None, "--weights-dir", envvar="TUNER_WEIGHTS_DIR",
                                                    help="Official checkpoints (not needed for tiny)."),
          metric: Optional[str] = typer.Option(None, "--metric", help="Quality metric to compare (default: "
                                               "the one the reference was searched for, else fid_vs_full)."),
          guard_metrics: str = typer.Option("psnr", "--guard-metrics", help="Comma-separated metrics that "
                                            "must not regress either ('' for none)."),
          samples: int = typer.Option(64, "--samples", help="Images in the paired re-evaluation."),
          seed: int = typer.Option(424242, "--seed", help="Seed of the re-evaluation (apart from search "
                                   "seeds)."),
          batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
          mem_tol: float = typer.Option(0.005, "--mem-tol", help="Allowed memory-fraction increase "
                                        "(absolute)."),
          psnr_tol: float = typer.Option(0.5, "--psnr-tol", help="Allowed PSNR drop in dB."),
          ssim_tol: float = typer.Option(0.02, "--ssim-tol", help="Allowed SSIM drop."),
          fid_tol: float = typer.Option(0.15, "--fid-tol", help="Allowed fid_vs_full/fid/delta_fid increase, "
                                        "relative to the reference's value ..."),
          fid_abs_tol: float = typer.Option(1.0, "--fid-abs-tol", help="... but at least this much "
                                            "(absolute)."),
          allow_new: bool = typer.Option(False, "--allow-new", help="List candidates without a reference "
                                         "instead of failing.")) -> None:
    from tuner.options import check_seed
    from tuner.policy_check import Tolerances, compare, format_rows

    guards = _check_metrics(metric, guard_metrics)
    if samples < 2 or batch_size < 1:
        raise UserError("--samples must be at least 2 (Fréchet distance) and --batch-size positive")
    _check_tolerances({"--mem-tol": mem_tol, "--psnr-tol": psnr_tol, "--ssim-tol": ssim_tol,
                       "--fid-tol": fid_tol, "--fid-abs-tol": fid_abs_tol})
    check_seed(seed)
    pairs = _pair_with_references(candidates, reference, model, weights_dir, allow_new)
    tol = Tolerances(mem_tol, psnr_tol, ssim_tol, fid_tol, fid_abs_tol)
    rows = compare(pairs, _evaluator_cache(weights_dir), samples, seed, batch_size, tol, metric, guards)
    typer.echo(format_rows(rows))
    bad = [r for r in rows if r.regressed]
    typer.echo(f"{len(bad)} regression(s) in {len(rows)} polic{'y' if len(rows) == 1 else 'ies'} "
               f"({samples} images, seed {seed})" if bad else
               f"ok: {len(rows)} polic{'y' if len(rows) == 1 else 'ies'} no worse than the references "
               f"({samples} images, seed {seed})")
    if bad:
        raise typer.Exit(1)


def _check_metrics(metric: Optional[str], guard_metrics: str) -> tuple[str, ...]:
    """Check ``--metric`` and ``--guard-metrics`` against the known metrics; returns the guard names."""
    from tuner.quality.metric_info import METRICS

    if metric is not None and metric not in METRICS:
        raise UserError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    guards = tuple(g.strip() for g in guard_metrics.split(",") if g.strip())
    if any(g not in METRICS for g in guards):
        raise UserError(f"--guard-metrics {guard_metrics!r}: use names from {', '.join(METRICS)}")
    return guards


def _check_tolerances(tolerances: dict[str, float]) -> None:
    """Every tolerance (keyed by its flag) must be a non-negative finite number."""
    import math

    for flag, value in tolerances.items():
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"tolerances must be non-negative finite numbers: {flag} {value}")


def _pair_with_references(candidates: List[str], reference: List[str], model: Optional[str],
                          weights_dir: Optional[str], allow_new: bool) -> list:
    """Load the references and candidates, pair them, and check the weights of every model to re-evaluate."""
    from tuner.model.weights_check import check_weights
    from tuner.policy_check import load_entry, load_references, match

    model_cfg = _model(model) if model else None
    refs = load_references(reference, model_cfg)
    pairs = match([load_entry(c, model_cfg) for c in candidates], refs, allow_new)
    for name in sorted({cand.model for cand, ref in pairs if ref is not None}):
        # before any evaluation: the weights of every model to re-evaluate are there
        check_weights(name, None, None, weights_dir, random_weights_flag=False, ckpt_flags=False)
    return pairs


def _evaluator_cache(weights_dir: Optional[str]):
    """``evaluator_for(entry)``: builds each model's evaluator once per schedule, on first use (an
    Infinity file is re-evaluated on the token maps it records, whatever the model's default)."""
    from tuner.quality.evaluate import build_evaluator

    evaluators: dict = {}

    def evaluator_for(entry):
        key = (entry.model, tuple(sorted(entry.schedule.items())))
        if key not in evaluators:
            evaluators[key] = build_evaluator(entry.model, weights_dir=weights_dir, backend="torch",
                                              **entry.schedule)
        return evaluators[key]

    return evaluator_for
