"""Everything a running search holds (pool, study, tables, tracker) and the order it is set up in.

:func:`prepare_runtime` checks first and writes later: model name, output path, space file,
storage URL, cluster address, MLflow URI and weights are validated with no side effects
(:func:`validate`), so bad input leaves no study, no table, no run and no directory behind. Only then
is the worker pool started (model loaded once per worker), the output and database directories
created, the study opened or resumed, stale trials recovered and presets collected.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from tuner.errors import UserError
from tuner.search import trials as T
from tuner.search.config import SearchConfig

if TYPE_CHECKING:  # pragma: no cover
    import optuna
    from optuna.storages import RDBStorage
    from rich.console import Console

    from tuner.model.config import ModelConfig
    from tuner.search.evaluations import EvaluationService
    from tuner.search.objective import Objective
    from tuner.search.planner import Planner
    from tuner.search.ray_pool import RayPool
    from tuner.search.space import SearchSpace
    from tuner.search.storage import TunerTables
    from tuner.search.study import Preset, WarmStart
    from tuner.search.tracker_guard import GuardedTracker
    from tuner.search.tracking import NullTracker
    from tuner.search.workers import InlinePool


@dataclass
class SearchRuntime:
    """What a running search holds; built by :func:`prepare_runtime`, closed by :meth:`close`."""

    cfg: SearchConfig
    console: "Console"
    model_cfg: "ModelConfig"
    space: "SearchSpace"
    space_file: Path
    objective: "Objective"
    tracker: "GuardedTracker | NullTracker"
    pool: "InlinePool | RayPool | None" = None
    info: dict[str, Any] = field(default_factory=dict)  # the workers' model description
    storage: "RDBStorage | None" = None
    tables: "TunerTables | None" = None
    study: "optuna.Study | None" = None
    resumed: bool = False
    session_id: str = ""
    presets: list["Preset"] = field(default_factory=list)
    warm_starts: list["WarmStart"] = field(default_factory=list)  # enqueued by tuner.search.prescreen
    planner: "Planner | None" = None
    evals: "EvaluationService | None" = None
    screen_specs: list[dict[str, Any]] = field(default_factory=list)  # one per rung (tuner.search.fidelity)
    final_spec: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        """The evaluations' identity in cache keys (weights, and for Infinity prompts and text encoder)."""
        return str(self.info.get("model_hash", ""))

    @property
    def checkpoint_sha256(self) -> str:
        """What an exported policy records: the weights' sha256 (what `--policy` checks against the
        loaded weights); the model hash for random weights, which have none."""
        return str(self.info.get("checkpoint_sha256") or self.model_hash)

    def close(self, status: str = "FINISHED") -> None:
        for step in (lambda: self.tracker and self.tracker.finish(status),
                     lambda: (self.tables and self.session_id
                              and self.tables.heartbeat(self.session_id, finished=True)),
                     lambda: self.pool and self.pool.close(),
                     lambda: self.tables and self.tables.close()):
            try:
                step()
            except Exception:  # noqa: BLE001 - closing must not hide the original error
                pass


def make_pool(cfg: SearchConfig):
    from tuner.search.ray_pool import RayPool
    from tuner.search.workers import InlinePool

    kwargs = {"model": cfg.model, "weights_dir": cfg.weights_dir, "var_ckpt": cfg.var_ckpt,
              "vae_ckpt": cfg.vae_ckpt, "dtype": cfg.dtype, "backend": cfg.backend}
    # only when set: an evaluator factory written before these flags still gets what it takes
    extra = {"random_weights": cfg.random_weights or None, "sides": cfg.sides, "prompts": cfg.prompts,
             "aspect": cfg.aspect, "scales": cfg.scales}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    kwargs.update(dict(cfg.evaluator_kwargs))
    if cfg.workers == 0:
        if "device" not in kwargs:
            kwargs["device"] = _local_device(cfg.device)
        return InlinePool(cfg.evaluator, kwargs, threads=cfg.threads)
    return RayPool(cfg.evaluator, kwargs, cfg.workers, cfg.ray_address, cfg.trial_timeout_s,
                   device=cfg.device, gpus=cfg.gpus, threads=cfg.threads)


def _local_device(name: str) -> str:
    if name not in (None, "", "auto"):
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _calibration(info: dict[str, Any]) -> Any:
    """The worker's calibration statistics (a plain dict) rebuilt for the driver's planner."""
    payload = info.get("calibration")
    if payload is None:
        return None
    from tuner.calibration import Calibration

    return Calibration.from_dict(payload)


def validate(cfg: SearchConfig):
    """Side-effect-free checks of everything checkable before the pool starts; returns (model config,
    space, space file). Nothing is created: the output and database directories are made later."""
    from tuner.model.config import model_config, require_engine
    from tuner.paths import check_writable_dir
    from tuner.search.config import DEFAULT_EVALUATOR
    from tuner.search.space_files import load_space, space_path_for
    from tuner.search.storage import check_storage_url
    from tuner.search.tracking import check_tracking_uri

    try:
        model_cfg = model_config(cfg.model)
    except KeyError as exc:
        raise UserError(f"--model: {exc.args[0]}") from None
    require_engine(cfg.model)
    model_cfg = _at_sides(model_cfg, cfg)
    check_writable_dir(cfg.out, "--out")
    space_file = Path(cfg.space) if cfg.space else space_path_for(cfg.family)
    try:
        space = load_space(space_file, model_cfg.geometry)
    except UserError as exc:  # the loader names the file and line; the flag is named here
        raise UserError(f"--space {exc}" if cfg.space else str(exc)) from None
    check_storage_url(cfg.storage)
    local = cfg.ray_address is None or cfg.workers == 0
    if cfg.workers != 0:
        from tuner.search.ray_pool import check_ray_address

        check_ray_address(cfg.ray_address)
    if cfg.tracking_enabled:
        check_tracking_uri(cfg.mlflow_uri)
    if cfg.evaluator == DEFAULT_EVALUATOR and local:
        # the workers load the weights only after Ray started; a remote cluster's nodes hold their own
        from tuner.model.weights_check import check_weights

        check_weights(cfg.model, cfg.var_ckpt, cfg.vae_ckpt, cfg.weights_dir, random_weights_flag=True,
                      random_weights=cfg.random_weights)
    return model_cfg, space, space_file


def _at_sides(model_cfg: Any, cfg: SearchConfig) -> Any:
    """The model config the driver plans with (an Infinity model at ``--aspect``, ``--scales`` or
    ``--sides``, as the workers load it); ``--prompts`` refused for a class-conditional model."""
    from tuner.model.config import at_schedule

    if model_cfg.kind != "infinity" and cfg.prompts is not None:
        raise UserError(f"--prompts applies to Infinity models only, not --model {cfg.model}")
    return at_schedule(model_cfg, sides=cfg.sides, aspect=cfg.aspect, scales=cfg.scales)


def make_directories(cfg: SearchConfig) -> Path:
    """The output directory and the SQLite databases' directories, once every check passed."""
    from tuner.paths import writable_dir
    from tuner.search.storage import _sqlite_path

    out = writable_dir(cfg.out)
    urls = [(cfg.storage, "--storage")] + ([(cfg.mlflow_uri, "--mlflow-uri")] if cfg.tracking_enabled else [])
    for url, flag in urls:
        path = _sqlite_path(url)
        if path is not None:
            writable_dir(path.parent, flag)
    return out


def prepare_runtime(cfg: SearchConfig, console: Any) -> SearchRuntime:
    """Check everything (:func:`validate`), then set the search up in order: pool, directories, planner,
    study and session (stale trials recovered), evaluation service, presets, tracker, ``config.json``.

    On any failure after the checks, what was set up is closed (:meth:`SearchRuntime.close`).
    """
    from tuner.search.evaluations import EvaluationService
    from tuner.search.objective import Objective
    from tuner.search.tracking import NullTracker

    model_cfg, space, space_file = validate(cfg)
    objective = Objective.from_config(cfg)  # the one objective of this run
    rt = SearchRuntime(cfg, console, model_cfg, space, space_file, objective, tracker=NullTracker())
    try:
        rt.pool = make_pool(cfg)
        rt.info = rt.pool.start()
        out = make_directories(cfg)  # after the pool: a worker that cannot start leaves nothing behind
        _set_up_planning(rt)
        _open_study(rt)
        rt.evals = EvaluationService(rt.tables, rt.pool, rt.model_hash, cfg.study_name, rt.session_id)
        _collect_presets(rt)
        _start_tracking(rt, out)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_hash": rt.model_hash,
                                                      "space_digest": space.digest}, indent=2) + "\n")
        word = "resumed" if rt.resumed else "created"
        console.print(f"study {cfg.study_name} {word} in {cfg.storage} ({objective.describe()}); "
                      f"{rt.pool.status()}", highlight=False)
        return rt
    except BaseException:
        rt.close("FAILED")
        raise


def _set_up_planning(rt: SearchRuntime) -> None:
    """The screening and final evaluation specs and the planner (whose policy spec carries the started
    workers' calibration), from the workers' model description."""
    from tuner.policies.base import PolicySpec
    from tuner.search.planner import Planner

    cfg, model_cfg = rt.cfg, rt.model_cfg
    num_classes = num_conditions(rt)
    common = dict(cfg=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.eval_batch_size)
    from tuner.search.fidelity import chunk_specs

    rt.screen_specs = chunk_specs(cfg.fidelity, T.eval_spec(cfg.samples, num_classes, cfg.seed, **common))
    rt.final_spec = T.eval_spec(cfg.final_samples, num_classes, cfg.seed, final=True, **common)
    spec = PolicySpec(model_cfg.geometry, model_cfg.name, _calibration(rt.info))
    rt.planner = Planner(model_cfg, spec, cfg.mem_target, fit=cfg.fits_to_target)


def num_conditions(rt: SearchRuntime) -> int:
    """What the workers' model is conditioned on, counted (classes, or an Infinity model's prompts; the
    description's key is ``num_classes`` for both), else the VAR config's classes."""
    if "num_classes" in rt.info:
        return int(rt.info["num_classes"])
    return int(rt.model_cfg.var.num_classes)


def _open_study(rt: SearchRuntime) -> None:
    """Open the storage and tables, create or resume the study, open this driver's session and re-queue
    the trials an earlier driver left running."""
    import optuna

    from tuner.search import study as S
    from tuner.search.storage import TunerTables, open_optuna_storage

    cfg, console, space = rt.cfg, rt.console, rt.space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rt.storage = open_optuna_storage(cfg.storage)
    rt.tables = TunerTables(cfg.storage)
    identity = {**cfg.identity(), "directions": rt.objective.names}
    rt.study, rt.resumed = S.open_study(rt.storage, cfg.study_name, rt.objective.directions, identity,
                                        S.make_sampler(cfg.sampler, cfg.seed, cfg.trials),
                                        pruner=S.make_pruner(cfg.fidelity))
    if rt.study.user_attrs.get(S.A_SPACE_DIGEST) not in (None, space.digest):
        console.print(f"note: the search space changed since this study started ({rt.space_file})",
                      highlight=False)
    rt.study.set_user_attr(S.A_SPACE_DIGEST, space.digest)
    rt.session_id = uuid.uuid4().hex
    rt.tables.open_session(rt.session_id, cfg.study_name)
    recovered = S.recover_stale_trials(rt.study, rt.tables.live_sessions(cfg.study_name), rt.session_id)
    if recovered:
        console.print(f"re-queued {len(recovered)} trial(s) left running by an earlier driver: {recovered}",
                      highlight=False)


def _collect_presets(rt: SearchRuntime) -> None:
    """Load the paper presets (unless ``--no-presets``) and their int8 / int4 variants; those the space
    can express become ``rt.warm_starts``, the study's first trials (enqueued once per study by
    :func:`tuner.search.prescreen.warm_start`; all presets are compared in the final round)."""
    from tuner.search import study as S

    spec = rt.planner.spec
    base = S.load_presets(rt.model_cfg, spec.calibration) if rt.cfg.presets else []
    rt.presets, merged = S.distinct_presets(base + S.quantized_presets(base), rt.planner)
    if merged:
        rt.console.print("presets identical once fitted to the target (each evaluated once): "
                         + ", ".join(f"{a} = {b}" for a, b in merged), highlight=False)
    published = [p for p in rt.presets if p.params.get("kv_format", "compute") == "compute"]
    quantized = [p for p in rt.presets if p not in published]

    def forms(presets):
        return S.budgets_forms(presets, spec.geometry, build=lambda f, p: rt.planner.plan(f, p).policy)

    # Warm starts in this order unless the proxy ranks them: the published presets, the baselines'
    # budgets forms, then the same quantized.
    extra = forms(published) + quantized + forms(quantized)
    rt.warm_starts, _ = S.preset_warm_starts(rt.space, published, extra)


def _start_tracking(rt: SearchRuntime, out: Path) -> None:
    """Open the tracker (guarded: failures only warn) and start or resume the study's run."""
    from tuner.search import study as S
    from tuner.search.tracker_guard import GuardedTracker
    from tuner.search.tracking import open_tracker

    cfg = rt.cfg
    rt.tracker = GuardedTracker(open_tracker(cfg.mlflow_uri, cfg.experiment, out / "mlartifacts"),
                                warn=lambda text: rt.console.print(text, highlight=False))
    run_id = rt.tracker.start_study(cfg.study_name, cfg.to_dict(), space_file=str(rt.space_file),
                                    model_hash=rt.model_hash,
                                    resume_run_id=rt.study.user_attrs.get(S.A_MLFLOW_RUN))
    if run_id:
        rt.study.set_user_attr(S.A_MLFLOW_RUN, run_id)
