"""Typer command functions for ``tuner search``, ``tuner studies`` and ``tuner show``.

The CLI app registers them (``app.command("search")(search_command)`` …); heavy imports happen only
when a command runs. Flags map 1:1 onto :class:`tuner.search.config.SearchConfig`.
"""
from __future__ import annotations

from typing import List, Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import user_errors
from tuner.errors import UserError
from tuner.quality.metric_info import METRICS


# --family's help names the searchable families: filled in by register() from the registry and the space
# files (when the CLI is built, not at import).
_FAMILY_OPTION = typer.Option("all", "--family", help="A searchable policy family or all.")


def register(app: typer.Typer) -> None:
    """Register the three commands on ``app`` (what ``tuner.cli.app`` calls)."""
    from tuner.search.space_files import family_help

    _FAMILY_OPTION.help = family_help()
    app.command("search",
                help="Search KV-cache policies for a model under a memory target and/or quality limit.")(
        search_command)
    app.command("studies",
                help="List the searches (studies) in a storage with trial counts and best values.")(
        studies_command)
    app.command("show", help="Show a study's Pareto front and its exported policy file.")(show_command)


def _console():
    """stdout console; wide when piped so tables are not squeezed to 80 columns."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)


def _short(value) -> str:
    """Compact parameter values for tables (4 significant digits; lists abbreviated)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        inner = ",".join(_short(v) for v in value[:4])
        return f"[{inner}{',…' if len(value) > 4 else ''}]"
    return str(value)


def _evaluator_args(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--evaluator-arg {item!r} must look like key=value")
        out[key] = value
    return out


@user_errors
def search_command(
    model: str = mo.ModelOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    prompts: Optional[str] = mo.PromptsOpt,
    mem_target: Optional[str] = typer.Option(None, "--mem-target",
                                             help="KV memory target: 15%, 0.15 (of the full cache) "
                                                  "or 40MiB per image."),
    fid_limit: Optional[float] = typer.Option(None, "--fid-limit",
                                              help="Quality limit on --metric (at most; "
                                                   "at least for psnr/ssim)."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help=f"Quality metric: {', '.join(METRICS)}. Default: psnr (paired with the full "
                               "cache per image, low noise at few samples) under --mem-target alone, "
                               "fid_vs_full with --fid-limit."),
    family: str = _FAMILY_OPTION,
    space: Optional[str] = typer.Option(None, "--space",
                                        help="A search-space YAML file (overrides --family)."),
    trials: int = typer.Option(40, "--trials", help="Total finished trials the study should reach."),
    timeout: Optional[float] = typer.Option(None, "--timeout",
                                            help="Stop asking new trials after this many seconds."),
    patience: Optional[int] = typer.Option(None, "--patience",
                                           help="Stop after N evaluated trials without improvement."),
    samples: Optional[int] = typer.Option(
        None, "--samples", help="Screening images of a trial that is never pruned (default 128; 256, the "
                                "minimum, for fid_vs_full/fid/delta_fid)."),
    min_samples: int = typer.Option(8, "--min-samples",
                                    help="Images every trial gets before the pruner may stop it (the "
                                         "first rung; = --samples turns pruning off)."),
    reduction_factor: int = typer.Option(4, "--reduction-factor",
                                         help="Successive halving: each rung has ×N images and ~1/N of "
                                              "the trials go on to it."),
    final_samples: Optional[int] = typer.Option(
        None, "--final-samples", help="Images per final (held-out) re-evaluation (default 128; 256 with "
                                      "a distribution metric)."),
    final_top_k: Optional[int] = typer.Option(None, "--final-top-k",
                                              help="Best candidates re-evaluated on held-out "
                                              "seeds before export (default 3; 12 with --fid-limit alone)."),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="CPU workers (default: one per GPU, else half the cores; "
                                               "0 = in-process)."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="Torch threads per CPU worker (default: the cores left "
                                               "after the driver, shared by the workers)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Join a Ray cluster: auto or host:port."),
    gpus: Optional[int] = typer.Option(None, "--gpus",
                                       help="Ask the cluster's autoscaler for N GPUs (one worker "
                                            "each) and wait for them before searching."),
    storage: Optional[str] = typer.Option(None, "--storage",
                                          help="SQLAlchemy URL (default sqlite:///<out>/study.db)."),
    study_name: Optional[str] = typer.Option(None, "--study-name",
                                             help="Study name (default from model and target)."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", envvar="MLFLOW_TRACKING_URI",
                                             help="MLflow tracking URI (default sqlite:///<out>/mlflow.db; "
                                                  "none = off)."),
    experiment: Optional[str] = typer.Option(None, "--experiment",
                                             help="MLflow experiment (default varkv-<model>)."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, nsga2, gp or random."),
    seed: int = typer.Option(0, "--seed", help="Sampler seed and base sampling seed."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory (default runs/<study>)."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    attention_backend: str = mo.BackendOpt,
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance of the evaluation "
                                        "(default: the model's own, 1.5 for VAR and 3 for Infinity)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k sampling of the evaluation (default: "
                                        "900)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p sampling of the evaluation (default: "
                                          "0.96 for VAR, 0.97 for Infinity)."),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size",
                                        help="Images per forward pass in evaluations."),
    trial_timeout: float = typer.Option(3600.0, "--trial-timeout",
                                        help="Seconds before a worker counts as hung."),
    no_presets: bool = typer.Option(False, "--no-presets", help="Do not enqueue the paper presets first."),
    proxy_candidates: int = typer.Option(
        32, "--proxy-candidates", help="With --mem-target: rank this many random policies and the "
                                        "presets by the zero-generation proxy before searching, and run "
                                        "them best first (0 = off: presets in their listed order)."),
    proxy_top: int = typer.Option(8, "--proxy-top",
                                  help="Enqueue the proxy's best N random policies as warm starts, "
                                       "ranked together with the presets."),
    no_fit: bool = typer.Option(False, "--no-fit",
                                help="With --mem-target: do not fit each policy's budget knob "
                                      "(token cap, budget fraction, curve level) to the target."),
    grids: Optional[bool] = typer.Option(
        None, "--grids/--no-grids",
        help="At the end, log same-seed image grids (4 classes: full cache | policy | 4x difference) of "
             "the winner and the Pareto front (on their trial runs) and of every preset (on the study "
             "run) to MLflow, also written to <out>/grids/. Default: on when MLflow tracking is on."),
    no_progress: bool = typer.Option(False, "--no-progress",
                                     help="No live display (one line per trial only)."),
    evaluator: str = typer.Option("tuner.quality.evaluate:build_evaluator", "--evaluator", hidden=True),
    evaluator_arg: List[str] = typer.Option([], "--evaluator-arg", hidden=True),
) -> None:
    from tuner.search.config import resolve_config
    from tuner.search.driver import run_search

    config = resolve_config(
        model=model, weights_dir=weights_dir, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt, mem_target=mem_target,
        fid_limit=fid_limit, metric=metric, family=family, space=space, trials=trials, timeout_s=timeout,
        patience=patience, samples=samples, min_samples=min_samples, reduction_factor=reduction_factor,
        final_samples=final_samples, final_top_k=final_top_k, workers=workers, threads=threads,
        ray_address=ray_address, gpus=gpus, storage=storage, study_name=study_name, mlflow_uri=mlflow_uri,
        experiment=experiment, sampler=sampler, seed=seed, out=out, device=device, dtype=dtype,
        backend=attention_backend, cfg=cfg, top_k=top_k, top_p=top_p, eval_batch_size=eval_batch_size,
        trial_timeout_s=trial_timeout, presets=not no_presets, proxy_candidates=proxy_candidates,
        proxy_top=proxy_top, fit_memory=not no_fit, grids=grids, evaluator=evaluator,
        evaluator_kwargs=_evaluator_args(evaluator_arg), random_weights=random_weights, sides=sides,
        aspect=aspect, scales=scales, prompts=prompts)
    result = run_search(config, progress=not no_progress)
    if result.interrupted:
        raise typer.Exit(result.exit_code)


@user_errors
def studies_command(
    storage: str = typer.Option(..., "--storage", help="SQLAlchemy URL of the search database."),
) -> None:
    from rich.table import Table

    from tuner.search.studies import list_studies

    rows = list_studies(storage)
    if not rows:
        typer.echo(f"no studies in {storage}")
        return
    table = Table(title=f"studies in {storage}")
    for col in ("study", "trials", "evaluated", "feasible", "objective", "best"):
        table.add_column(col, no_wrap=col == "study")
    for s in rows:
        table.add_row(s.name, str(s.trials), str(s.evaluated), str(s.feasible), s.objective, s.best)
    console = _console()
    console.print(table)
    for s in rows:  # full paths on their own lines: copyable, never wrapped inside a cell
        console.print(f"{s.name}: exported policy {s.exported or '(none yet)'}", highlight=False,
                      soft_wrap=True)


@user_errors
def show_command(
    study: str = typer.Argument(..., help="Study name (see tuner studies)."),
    storage: str = typer.Option(..., "--storage", help="SQLAlchemy URL of the search database."),
) -> None:
    from rich.table import Table

    from tuner.search.studies import show_study

    objective, front, exports = show_study(storage, study)
    console = _console()
    if objective is None:
        console.print(f"{study} was not created by tuner search; no Pareto front to show")
        return
    table = Table(title=f"{study}: Pareto front (memory vs {objective.metric}); {objective.describe()}")
    for col in ("trial", "family", "preset", "memory", "KV MiB/img", objective.metric, "params"):
        table.add_column(col)
    for r in front:
        m = r.metrics
        table.add_row(str(r.number), r.family or "-", r.preset or "", f"{100 * m['memory_fraction']:.2f}%",
                      f"{m.get('kv_bytes_per_image', 0) / 2**20:.3f}",
                      f"{m.get(objective.metric, float('nan')):.4g}",
                      ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.params.items()))[:120])
    console.print(table)
    if not front:
        console.print("no feasible evaluated trial yet")
    for e in exports:
        source = f"trial {e.trial_number}" if e.trial_number is not None else "a paper preset"
        console.print(f"exported policy ({source}): {e.path}", highlight=False, soft_wrap=True)
    if not exports:
        console.print("no policy exported yet (the search exports when it finishes)")
