"""The resolved configuration of one search (docs/design.md, Search): a frozen dataclass built from CLI flags.

``SearchConfig`` is pure data validated in ``__post_init__`` (``ValueError``); :func:`resolve_config`
is the user-facing constructor that turns bad flags into one-line :class:`~tuner.errors.UserError`
messages and fills the defaults that depend on other fields (study name, output directory, storage
and tracking URIs). The resolved config is saved with the results and on the MLflow parent run.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.mem_target import MemTarget, parse_mem_target
from tuner.quality.metric_info import METRICS
from tuner.options import BACKENDS, DTYPE_NAMES, SAMPLER_SEED_MAX, sampling_problem, seed_problem

SAMPLERS = ("tpe", "nsga2", "gp", "random")
# --family choices are derived from the policy registry and the space files (search.space.family_choices)
DEFAULT_EVALUATOR = "tuner.quality.evaluate:build_evaluator"
NO_TRACKING = ("none", "off")


@dataclass(frozen=True)
class SearchConfig:
    """Everything one ``tuner search`` run needs; saved as ``config.json`` and on the MLflow run."""

    model: str = "tiny"
    weights_dir: str | None = None
    var_ckpt: str | None = None
    vae_ckpt: str | None = None
    mem_target: MemTarget | None = None
    quality_limit: float | None = None
    metric: str = "psnr"
    family: str = "all"
    space: str | None = None  # a YAML file; overrides ``family``
    trials: int = 40
    timeout_s: float | None = None
    patience: int | None = None
    samples: int = 128  # screening images of a trial that is never pruned (the top rung)
    min_samples: int = 8  # the first rung: images every trial gets before the pruner may stop it
    reduction_factor: int = 4  # successive halving's η: rungs grow ×η, ~1/η of the trials go on
    final_samples: int = 128
    final_top_k: int = 3
    workers: int | None = None  # None = one per GPU, else what fits the CPUs
    threads: int | None = None  # torch threads per CPU worker (None: tuner.threads.worker_threads)
    ray_address: str | None = None
    gpus: int | None = None  # ask the cluster autoscaler for this many GPUs (one worker each) first
    storage: str = ""
    study_name: str = ""
    mlflow_uri: str = ""
    experiment: str = ""
    sampler: str = "tpe"
    seed: int = 0
    out: str = ""
    device: str = "auto"
    dtype: str = "fp32"
    backend: str = "auto"
    # None: the model's own (tuner.model.config.default_sampling: VAR's FID settings, Infinity's CLI's)
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    eval_batch_size: int = 32
    trial_timeout_s: float = 3600.0
    presets: bool = True
    proxy_candidates: int = 32  # random policies ranked by the zero-generation proxy (0 = off)
    proxy_top: int = 8  # the best of them enqueued as warm starts, ranked with the presets by the proxy
    fit_memory: bool = True  # with a memory target only: each policy's budget knob set to fill it
    grids: bool | None = None  # same-seed image grids at export (None: on when MLflow tracking is on)
    evaluator: str = DEFAULT_EVALUATOR
    evaluator_kwargs: tuple[tuple[str, Any], ...] = ()
    random_weights: bool = False  # random weights of the model's shape (Infinity: random text features)
    sides: tuple[int, ...] | None = None  # Infinity: the schedule prefix generated (checked in validate)
    aspect: str | None = None  # Infinity: an official ratio H:W, reduced ("2:1"; fits the model: validate)
    scales: int | None = None  # Infinity: the first N maps of the ratio's schedule (checked in validate)
    prompts: str | None = None  # Infinity: a prompt file (absolute; default the built-in prompts)

    def __post_init__(self) -> None:
        from tuner.model.config import default_sampling

        own = default_sampling(self.model)
        for name in ("cfg", "top_k", "top_p"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(own, name))
        if self.metric not in METRICS:
            raise ValueError(f"--metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.space is None:
            # light: the registry imports no policy module
            from tuner.search.space_files import family_choices

            choices = family_choices()
            if self.family not in choices:
                raise ValueError(f"--family {self.family!r} is not one of {', '.join(choices)} "
                                 "(or pass --space FILE)")
        if self.mem_target is None and self.quality_limit is None:
            raise ValueError("give --mem-target (e.g. 15%) and/or --fid-limit: the search needs a target")
        if self.gpus is not None and self.ray_address is None:
            raise ValueError("--gpus asks a cluster's autoscaler for GPUs: give --ray-address too (e.g. auto "
                             "on the head node of `ray up ray_cluster.yaml`)")
        if self.quality_limit is not None:
            problem = quality_limit_problem(self.metric, self.quality_limit)
            if problem:
                raise ValueError(problem)
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--attention-backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        checks = (("--trials", self.trials, 1), ("--samples", self.samples, 2),
                  ("--min-samples", self.min_samples, 2), ("--reduction-factor", self.reduction_factor, 2),
                  ("--threads", self.threads if self.threads is not None else 1, 1),
                  ("--proxy-candidates", self.proxy_candidates, 0), ("--proxy-top", self.proxy_top, 0),
                  ("--final-samples", self.final_samples, 2), ("--final-top-k", self.final_top_k, 1),
                  ("--gpus", self.gpus if self.gpus is not None else 1, 1),
                  ("--eval-batch-size", self.eval_batch_size, 1))
        for flag, value, low in checks:
            if value < low:
                raise ValueError(f"{flag} {value} must be at least {low}")
        problem = fidelity_problem(self.metric, self.samples, self.final_samples, self.quality_limit)
        if problem:
            raise ValueError(problem)
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers {self.workers} must be >= 0 (0 evaluates in the driver process)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"--timeout {self.timeout_s} must be positive seconds")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience {self.patience} must be at least 1")
        if self.sides is not None and (not self.sides or min(self.sides) < 1):
            raise ValueError(f"--sides {self.sides} must be positive token-map sides like 1,2,4,6")
        if self.aspect is not None:
            from tuner.model.infinity_schedules import aspect_name, aspect_ratio

            object.__setattr__(self, "aspect", aspect_name(aspect_ratio(self.aspect)))  # "4:2" -> "2:1"
        if self.scales is not None and self.scales < 1:
            raise ValueError(f"--scales {self.scales} must be at least 1 (the first N maps of the schedule)")
        if self.trial_timeout_s <= 0:
            raise ValueError("the per-trial timeout must be positive")
        problem = (sampling_problem(self.cfg, self.top_k, self.top_p)
                   or seed_problem(self.seed, SAMPLER_SEED_MAX))
        if problem:
            raise ValueError(problem)
        if ":" not in self.evaluator:
            raise ValueError(f"evaluator factory {self.evaluator!r} must look like 'package.module:function'")
        for name in ("storage", "study_name", "out", "mlflow_uri", "experiment"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be resolved (use resolve_config)")

    # -- derived facts ---------------------------------------------------------------------------------
    @property
    def fits_to_target(self) -> bool:
        """Policies are fitted to the memory target (quality-under-memory searches only)."""
        return self.fit_memory and self.mem_target is not None and self.quality_limit is None

    @property
    def fidelity(self):
        """The screening schedule (:mod:`tuner.search.fidelity`): rungs from ``--min-samples`` to
        ``--samples`` when the objective is a paired quality metric (``--mem-target`` alone), else one
        rung: under ``--fid-limit`` the objective is memory, known before any image, and pruning on
        quality would favour the policies that spend more memory."""
        from tuner.search.fidelity import Fidelity, rungs_for

        quality_objective = self.mem_target is not None and self.quality_limit is None
        if METRICS[self.metric].paired and quality_objective:
            return Fidelity(rungs_for(self.min_samples, self.samples, self.reduction_factor),
                            self.reduction_factor)
        return Fidelity((self.samples,), self.reduction_factor)

    @property
    def tracking_enabled(self) -> bool:
        return self.mlflow_uri.lower() not in NO_TRACKING

    @property
    def grids_enabled(self) -> bool:
        """Same-seed comparison grids are rendered at export (:mod:`tuner.search.grids`): ``--grids`` /
        ``--no-grids``, by default whenever MLflow tracking is on."""
        return self.tracking_enabled if self.grids is None else bool(self.grids)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def space_label(self) -> str:
        return Path(self.space).stem if self.space else self.family

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (what is saved with the results)."""
        d = dataclasses.asdict(self)
        d["mem_target"] = self.mem_target.text if self.mem_target else None
        d["evaluator_kwargs"] = dict(self.evaluator_kwargs)
        return d

    def identity(self) -> dict[str, Any]:
        """The settings a study is bound to: re-running with other values needs another study name."""
        target = None
        if self.mem_target is not None:
            target = self.mem_target.fraction if self.mem_target.fraction is not None \
                else f"{self.mem_target.bytes_per_image}B"
        out = {"model": self.model, "metric": self.metric, "mem_target": target,
               "quality_limit": self.quality_limit, "space": self.space_label, "samples": self.samples,
               "rungs": list(self.fidelity.rungs),
               "seed": self.seed, "cfg": self.cfg, "top_k": self.top_k, "top_p": self.top_p,
               "fit_memory": self.fits_to_target}
        if self.sides is not None:  # only when set: studies made before the flag keep their identity
            out["sides"] = list(self.sides)
        if self.aspect is not None:  # likewise
            out["aspect"] = self.aspect
        if self.scales is not None:
            out["scales"] = self.scales
        return out


def quality_limit_problem(metric: str, limit: float) -> str | None:
    """Why ``--fid-limit`` can never be met on ``metric``, or None.

    Fréchet distances (``fid_vs_full``, ``fid``) are >= 0, so a negative limit excludes every policy;
    ``delta_fid`` (policy FID minus the full cache's) may be negative. ``ssim`` <= 1 and a limit of
    at most 0 admits everything, and PSNR is positive for 8-bit images.
    """
    if not math.isfinite(limit):
        return f"--fid-limit {limit} must be a finite number"
    if metric in ("fid_vs_full", "fid") and limit < 0:
        return (f"--fid-limit {limit} can never be met: {metric} is a distance (>= 0, lower is better); "
                f"give a limit >= 0, e.g. --fid-limit 2")
    if metric == "ssim" and not 0 < limit <= 1:
        return f"--fid-limit {limit} is not an SSIM limit; SSIM is at most 1: give one in (0, 1], e.g. 0.9"
    if metric == "psnr" and limit <= 0:
        return f"--fid-limit {limit} is not a PSNR limit; give a positive number of dB, e.g. 30"
    return None


def fidelity_problem(metric: str, samples: int, final_samples: int, limit: float | None) -> str | None:
    """Why the sample counts cannot measure ``metric``, or None.

    A distribution metric (a Fréchet distance between image sets) is noise below
    :data:`~tuner.quality.metric_info.MIN_DISTRIBUTION_SAMPLES` images (measured in
    experiments/search/fidelity.md), so screening on it needs that many; a limit on it is checked in
    the final round, which needs as many too.
    """
    from tuner.quality.metric_info import MIN_DISTRIBUTION_SAMPLES as MIN

    if METRICS[metric].paired:
        return None
    why = (f"{metric} compares two sets of images and is noise below {MIN} images (experiments/"
           f"search/fidelity.md)")
    if samples < MIN:
        return (f"--metric {metric} --samples {samples}: {why}; use --samples {MIN} or more, or screen on a "
                f"paired metric (--metric psnr, ssim or feat_dist)")
    if limit is not None and final_samples < MIN:
        return (f"--fid-limit on {metric} with --final-samples {final_samples}: {why}; "
                f"use --final-samples {MIN}")
    return None


def check_search_device(device: str, ray_address: str | None, workers: int | None = None) -> None:
    """``--device`` must name a torch device; where the evaluations run on this machine (no
    ``--ray-address``: a local cluster, or ``--workers 0``: in the driver) it must exist here. A remote
    cluster's devices cannot be seen from the driver: only the spelling is checked."""
    from tuner.options import check_device_name, resolve_device

    if device in (None, "", "auto"):
        return
    if ray_address is not None and workers != 0:
        check_device_name(device)
        return
    where = "--workers N with " if workers == 0 else ""
    resolve_device(device, hint=f"use --device cpu (or auto), or {where}--ray-address of a cluster with GPUs")


MEM_TARGET_METRIC = "psnr"  # paired per image: its noise at 8 screening images is small (FID's is not)
LIMIT_METRIC = "fid_vs_full"


def default_metric(mem: MemTarget | None, limit: float | None) -> str:
    """``--metric`` when not given: psnr when only a memory target is set, else fid_vs_full (the
    mission's "memory subject to FID")."""
    return MEM_TARGET_METRIC if mem is not None and limit is None else LIMIT_METRIC


def default_study_name(model: str, space_label: str, mem: MemTarget | None, limit: float | None,
                       metric: str) -> str:
    """Deterministic, so that re-running the same command resumes the same study."""
    parts = [model, space_label]
    if mem is not None:
        parts.append("mem" + (f"{mem.fraction * 100:g}pct" if mem.fraction is not None
                              else f"{mem.bytes_per_image}B"))
    if limit is not None:
        parts.append(f"{metric}{limit:g}")
    elif metric != default_metric(mem, limit):
        parts.append(metric)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


QUALITY_LIMIT_FINAL_TOP_K = 12


def resolve_config(*, mem_target: str | None = None, fid_limit: float | None = None,
                   out: str | None = None, storage: str | None = None, study_name: str | None = None,
                   mlflow_uri: str | None = None, experiment: str | None = None,
                   **fields: Any) -> SearchConfig:
    """Build a :class:`SearchConfig` from flag values; every problem becomes a one-line UserError.

    Defaults that depend on other flags: the study name (model, space, target), the output directory
    ``runs/<study>``, the storage ``sqlite:///<out>/study.db`` and MLflow ``sqlite:///<out>/mlflow.db``.
    """
    from tuner.model.config import NAMED_MODELS, require_engine

    model = fields.get("model", "tiny")
    if model not in NAMED_MODELS:
        raise UserError(f"--model {model!r} is unknown; known models: {', '.join(NAMED_MODELS)}")
    require_engine(model)
    if mem_target is not None and not str(mem_target).strip():
        raise UserError("--mem-target is empty; use a percentage like 15%, a fraction like 0.15 or 40MiB")
    mem = parse_mem_target(str(mem_target).strip()) if mem_target is not None else None
    space = fields.get("space")
    if space is not None:
        if not Path(space).is_file():
            raise UserError(f"--space {space}: no such file; pass a search-space YAML file")
        fields["space"] = str(Path(space).resolve())
    label = Path(space).stem if space else fields.get("family", "all")
    if fields.get("metric") is None:
        fields["metric"] = default_metric(mem, fid_limit)
    if fields.get("sides") is not None:
        from tuner.options import parse_int_list

        sides = fields["sides"]
        fields["sides"] = tuple(parse_int_list(sides, "--sides") if isinstance(sides, str) else sides)
    if fields.get("prompts") is not None:
        from tuner.model.prompts import read_prompts

        read_prompts(fields["prompts"])  # one-line error now, not in a worker
        fields["prompts"] = str(Path(fields["prompts"]).resolve())
    if fields.get("aspect") is not None:  # reduced before it names the study ("4:2" is "2:1")
        from tuner.model.config import parse_aspect
        from tuner.model.infinity_schedules import aspect_name

        fields["aspect"] = aspect_name(parse_aspect(fields["aspect"]))
    schedule = ([str(fields["aspect"]).replace(":", "x")] if fields.get("aspect") else []) \
        + ([f"s{fields['scales']}"] if fields.get("scales") else []) \
        + (["-".join(map(str, fields["sides"]))] if fields.get("sides") else [])
    name = study_name or default_study_name(f"{model}@{'-'.join(schedule)}" if schedule else model, label,
                                            mem, fid_limit, fields["metric"])
    out_dir = Path(out) if out else Path("runs") / name
    from tuner.quality.metric_info import MIN_DISTRIBUTION_SAMPLES

    if fields["metric"] not in METRICS:
        raise UserError(f"--metric {fields['metric']!r} is not one of {', '.join(METRICS)}")
    for key in ("samples", "final_samples"):  # a distribution metric needs its minimum (fidelity_problem)
        if fields.get(key) is None:
            fields[key] = 128 if METRICS[fields["metric"]].paired else max(128, MIN_DISTRIBUTION_SAMPLES)
    if fields.get("final_top_k", 0) is None:
        # Under a quality limit the cheapest screened trials sit at the limit and often miss it on the
        # held-out seeds (winner's curse): re-check more of them, so a cheap one that holds is found.
        fields["final_top_k"] = QUALITY_LIMIT_FINAL_TOP_K if fid_limit is not None and mem is None else 3
    if "evaluator_kwargs" in fields and isinstance(fields["evaluator_kwargs"], dict):
        fields["evaluator_kwargs"] = tuple(sorted(fields["evaluator_kwargs"].items()))
    try:
        config = SearchConfig(
            mem_target=mem, quality_limit=fid_limit, study_name=name, out=str(out_dir.resolve()),
            storage=storage or sqlite_url(out_dir / "study.db"),
            mlflow_uri=mlflow_uri or sqlite_url(out_dir / "mlflow.db"),
            experiment=experiment or f"varkv-{model}", **fields)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_search_device(config.device, config.ray_address, config.workers)
    return config
