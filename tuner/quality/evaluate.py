"""Paired evaluation of a policy against the full cache on the same labels and seeds (docs/design.md,
Quality).

``PolicyEvaluator`` loads a model once, generates (and caches) the full-cache reference images and
features per :class:`EvalSpec`, and turns a policy into a plain dict of metrics — what the search
workers return. Nothing here imports optuna, ray or mlflow.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from tuner.errors import UserError
from tuner.options import SAMPLING


@dataclass(frozen=True)
class EvalSpec:
    """Which images a policy is judged on: image ``i`` has condition ``labels[i]`` (a class id, or an
    index into an Infinity model's prompts); images are generated in batches of ``batch_size`` and
    batch ``j`` is sampled with seed ``seed + j``.
    """

    labels: tuple[int, ...]
    seed: int = 0
    cfg: float = SAMPLING.cfg
    top_k: int = SAMPLING.top_k
    top_p: float = SAMPLING.top_p
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("an evaluation needs at least one sample")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")

    @classmethod
    def balanced(cls, num_classes: int, samples: int, seed: int = 0, **kw: Any) -> "EvalSpec":
        """``samples`` images cycling through the classes (``samples`` must be >= 2 for FID)."""
        if samples <= 0:
            raise UserError(f"--samples {samples} must be positive (FID needs at least 2)")
        return cls(labels=tuple(i % num_classes for i in range(samples)), seed=seed, **kw)

    def key(self) -> str:
        """Stable hash of the spec (evaluation-cache key)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def samples(self) -> int:
        return len(self.labels)


@dataclass
class Reference:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], CPU
    features: torch.Tensor | None  # [N, F]
    seconds_per_image: float


@dataclass
class PolicyEvaluator:
    """Evaluates policies on one loaded model. Create with :func:`build_evaluator`."""

    loaded: Any  # tuner.model.loading.LoadedModel or tuner.model.infinity_runner.InfinityModel
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    backend: str = "torch"
    features: Callable[[torch.Tensor], torch.Tensor] | None = None
    reference_stats: Any = None  # tuner.quality.metrics.FeatureStats of the real/reference set
    spec_for: Callable[[Any], Any] | None = None  # policy -> PolicySpec (adds calibration)
    #: Called after every generated batch with ``(phase, images_in_batch)``; phase is ``"full cache"``
    #: for the reference images and ``"policy"`` otherwise (progress bars hook in here).
    progress: Callable[[str, int], None] | None = None
    #: How many :meth:`reference` calls were served from memory instead of regenerating the full cache.
    reference_hits: int = 0
    _refs: dict[str, Reference] = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        """The weights' identity in cache keys, with what the conditions mean (an Infinity prompt set;
        nothing for VAR, whose keys are unchanged) and, for a non-square Infinity schedule, its maps
        (the same weights at another aspect ratio make other images; square keys are unchanged)."""
        from tuner.model.runner import cache_key

        return cache_key(self.loaded)

    def policy_spec(self, policy):
        from tuner.policies.base import PolicySpec

        if self.spec_for is not None:
            return self.spec_for(policy)
        return PolicySpec(self.loaded.config.geometry, self.loaded.config.name)

    def generate(self, policy, spec: EvalSpec, phase: str = "policy") -> tuple[torch.Tensor, int, float]:
        """Images ``[N, 3, H, W]`` (CPU), KV bytes allocated per image, seconds per image.

        ``phase`` only labels the :attr:`progress` callbacks.
        """
        labels = torch.tensor(spec.labels, dtype=torch.long)
        pspec = self.policy_spec(policy)
        images, kv_per_image, seconds = [], 0, 0.0
        for j, chunk in enumerate(torch.split(labels, spec.batch_size)):
            t0 = time.perf_counter()
            res = self.loaded.generate_chunk(chunk, seed=spec.seed + j, cfg=spec.cfg, top_k=spec.top_k,
                                             top_p=spec.top_p, policy=policy, spec=pspec,
                                             backend=self.backend, dtype=self.dtype)
            seconds += time.perf_counter() - t0
            images.append(res.images.cpu())
            kv_per_image = max(kv_per_image, res.kv_bytes_allocated // len(chunk))
            if self.progress is not None:
                self.progress(phase, len(chunk))
        return torch.cat(images), kv_per_image, seconds / spec.samples

    def embed(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.features is None:
            return None
        with torch.no_grad():
            return torch.cat([self.features(b) for b in torch.split(images, 256)]).float()

    def reference(self, spec: EvalSpec) -> Reference:
        """Full-cache images and features for ``spec``, computed once per evaluator."""
        from tuner.policies.full import FullPolicy

        if spec.key() in self._refs:
            self.reference_hits += 1
        else:
            images, _, sec = self.generate(FullPolicy(), spec, phase="full cache")
            self._refs[spec.key()] = Reference(images, self.embed(images), sec)
        return self._refs[spec.key()]

    def evaluate(self, family: str, params: dict, spec: EvalSpec) -> dict[str, float]:
        """Metrics of one policy: memory, fidelity vs full cache, FID vs reference, latency.

        Paired metrics (``psnr``, ``ssim``, ``feat_dist``) are means over images with their standard
        errors (``<name>_se``); the distribution metrics (``fid_vs_full``, ``fid``, ``delta_fid``)
        are one number per image set and mean something only from
        :data:`tuner.quality.metric_info.MIN_DISTRIBUTION_SAMPLES` images on.
        """
        from tuner.memory import memory_report
        from tuner.policies.registry import make_policy
        from tuner.quality.metrics import (feature_distance_per_image, frechet_distance, mean_and_se,
                                           psnr, psnr_per_image, ssim_per_image)

        policy = make_policy(family, params)
        ref = self.reference(spec)
        images, kv_bytes, sec = self.generate(policy, spec)
        report = memory_report(policy, self.loaded.config, dtype="fp16", cfg=True,
                               spec=self.policy_spec(policy))
        out = {
            "memory_fraction": float(report.fraction),
            "kv_bytes_per_image": float(report.kv_bytes_per_image),
            "psnr": float(psnr(images, ref.images)),
            "latency_s_per_image": float(sec),
            "full_latency_s_per_image": float(ref.seconds_per_image),
            "samples": float(spec.samples),
        }
        # paired per-image metrics: mean and its standard error (the screening noise, known at any N)
        out["psnr_se"] = mean_and_se(psnr_per_image(images, ref.images))[1]
        out["ssim"], out["ssim_se"] = mean_and_se(ssim_per_image(images, ref.images))
        feats = self.embed(images)
        if feats is not None:
            dist = feature_distance_per_image(feats, ref.features)
            out["feat_dist"], out["feat_dist_se"] = mean_and_se(dist)
        if feats is not None and spec.samples >= 2:
            out["fid_vs_full"] = float(frechet_distance(feats, ref.features))
            if self.reference_stats is not None:
                from tuner.quality.metrics import FeatureStats, fid_from_stats

                fid = fid_from_stats(FeatureStats.from_features(feats), self.reference_stats)
                fid_full = fid_from_stats(FeatureStats.from_features(ref.features), self.reference_stats)
                out.update(fid=float(fid), delta_fid=float(fid - fid_full))
        return out

    def proxy_scores(self, items: list[tuple[str, dict]]) -> list[float]:
        """Zero-generation proxy scores (:mod:`tuner.quality.proxy`, lower = better predicted quality)
        of ``[(family, params)]``; the full-cache recording is made once and cached on disk."""
        from tuner.policies.registry import make_policy
        from tuner.quality.proxy import proxy_score

        if getattr(self, "_proxy_record", None) is None:
            from tuner.quality.proxy_record import load_or_record_proxy

            self._proxy_record = load_or_record_proxy(self.loaded, checkpoint_sha256=self.model_hash,
                                                      backend=self.backend)
        out = []
        for family, params in items:
            policy = make_policy(family, params)
            out.append(float(proxy_score(self._proxy_record, policy, self.policy_spec(policy),
                                         backend=self.backend).score))
        return out

    def grid_columns(self, family: str, params: dict, request: dict) -> Any:
        """Full cache | policy | difference images for a comparison grid (``[N, 3, 3, h, w]`` float32,
        :mod:`tuner.quality.grid_images`); ``request``: labels, seed, cfg, top_k, top_p, max_side."""
        from tuner.quality.grid_images import GridRequest, grid_columns

        return grid_columns(self, family, params, GridRequest.from_dict(request))

    def calibration(self):
        """Calibration statistics of this model (cached on disk by checkpoint hash), computed once."""
        if getattr(self, "_calibration", None) is None:
            from tuner.calibration import CalibrationSpec, load_or_compute_calibration

            sampling = self.loaded.config.sampling.as_kwargs()
            self._calibration = load_or_compute_calibration(
                self.loaded, checkpoint_sha256=self.model_hash,
                spec=CalibrationSpec(samples=self.calibration_samples, **sampling),
                backend=self.backend)
        return self._calibration

    def describe(self) -> dict:
        """Facts the search driver needs from a worker: conditions (classes or prompts; the key keeps
        its name) and the calibration it plans with."""
        return {"num_classes": self.loaded.num_conditions, "model": self.loaded.config.name,
                "calibration": self.calibration().to_dict()}


def _spec_with_calibration(evaluator: PolicyEvaluator):
    from tuner.policies.base import PolicySpec

    geometry = evaluator.loaded.config.geometry

    def spec_for(policy):
        cal = evaluator.calibration() if policy.needs_calibration else None
        return PolicySpec(geometry, evaluator.loaded.config.name, cal)

    return spec_for


def tiny_reference_stats(features, samples: int = 2000, seed: int = 777):
    """Statistics of the procedural training distribution (the tiny model's "real" reference set)."""
    from tuner.data.procedural import make_dataset
    from tuner.quality.metrics import FeatureStats

    images, _ = make_dataset(samples, seed=seed)
    with torch.no_grad():
        feats = torch.cat([features((b + 1) / 2) for b in torch.split(images, 256)]).double()
    return FeatureStats.from_features(feats)


def build_evaluator(model: str = "tiny", *, weights_dir=None, var_ckpt=None, vae_ckpt=None,
                    device: str = "cpu",
                    dtype: str = "fp32", backend: str = "auto", inception_weights=None, reference=None,
                    calibration_samples: int = 16, random_weights: bool = False, sides=None,
                    prompts: str | None = None, aspect: str | None = None,
                    scales: int | str | None = None) -> PolicyEvaluator:
    """Load a model and its feature network once; the factory the search workers call.

    ``sides`` (Infinity: a schedule prefix, ``"1,2,4,6"`` or a tuple), ``aspect`` (Infinity: ``"2:1"``),
    ``scales`` (Infinity: the first N maps) and ``prompts`` (Infinity: a prompt file; default the built-in
    prompts) as ``tuner generate`` takes them.

    Features: the shipped tiny feature net for ``tiny``; the FID Inception-v3 (local weights) for
    ImageNet models, without which only PSNR/SSIM are reported. ``reference``: a reference batch
    ``.npz`` for ``fid``/``delta_fid`` (tiny uses a fixed generated reference set).
    """
    from varkv_kernels.dispatch import resolve_backend
    from tuner.model.loading import load_model

    from tuner.model.prompts import read_prompts
    from tuner.options import parse_int_list

    if isinstance(sides, str):  # from --evaluator-arg or a worker's string kwargs
        sides = parse_int_list(sides, "--sides")
    if isinstance(random_weights, str):
        random_weights = random_weights.strip().lower() in ("1", "true", "yes")
    loaded = load_model(model, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt, weights_dir=weights_dir,
                        random_weights=random_weights, device=device, sides=sides, aspect=aspect,
                        scales=None if scales is None else int(scales),
                        prompts=read_prompts(prompts) if prompts is not None else None)
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    features, stats = None, None
    if loaded.config.name == "tiny":
        from tuner.quality.features import load_feature_net

        features = load_feature_net().to(device).eval()
        stats = tiny_reference_stats(features)
    elif inception_weights is not None:
        from tuner.quality.inception import load_fid_inception

        features = load_fid_inception(inception_weights).to(device).eval()
    if reference is not None and features is not None:
        from tuner.quality.reference_stats import reference_stats

        stats = reference_stats(reference, features, loaded.config.resolution)
    try:
        resolved = resolve_backend(backend, device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    ev = PolicyEvaluator(loaded, device=device, dtype=tdtype, backend=resolved, features=features,
                         reference_stats=stats)
    ev.calibration_samples = calibration_samples
    ev.spec_for = _spec_with_calibration(ev)
    return ev
