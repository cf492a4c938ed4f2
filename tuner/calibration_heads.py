"""Per-(layer, head) calibration statistics from full-cache runs, cached on disk (issue 17's groundwork).

Measured on the same images as :mod:`tuner.calibration` (:func:`~tuner.calibration.run_calibration_images`
with ``spec.images``), in fp32, both CFG rows of every image averaged:

- **mass** ``mass[l, h, s_q, s_src]`` (HeatKV, arXiv 2605.14877): the softmax mass that a query of scale
  ``s_q`` puts on the keys of scale ``s_src``, averaged over the queries of ``s_q``, the rows and the
  images. Each row ``mass[l, h, s_q, :s_q + 1]`` sums to 1; entries above the diagonal are 0. HeatKV's
  ranking score S-CAS is :meth:`HeadStats.scas` (HeatKV's code scores the conditional row only; here
  both rows count, like every other calibration statistic).
- **dispersion** ``dispersion[l, h]`` (HACK, arXiv 2504.09261: *contextual* heads show vertical
  attention patterns, every query reading the same keys of earlier scales; *structural* heads show
  (multi-)diagonal ones, each query reading the spatially aligned keys). For query ``i`` of scale ``s``
  let ``p_i`` be its attention over the history (keys of scales ``< s``), renormalised to sum to 1, and
  ``m = mean_i p_i``. Then ``dispersion[l, h, s] = mean_i H(p_i) / H(m)`` (entropies in nats) =
  ``1 - I(query; key) / H(key)``: 1 when every query spreads over the same history keys (vertical
  stripes, or uniformly broad attention: contextual), towards 0 when each query reads keys of its own
  (diagonal: structural). It is computed per row, averaged over rows and images, and
  ``dispersion[l, h]`` is its mean over the scales whose history has at least 2 tokens (``H(m) < 1e-6``
  counts as 1: all queries on one key). HACK's own formula (an "attention variance") could not be read
  here; this is our measurement of the pattern difference it describes. It says nothing about *how
  much* a head reads the history: that is ``mass``.
- **contextual** ``contextual[l, h]``: ``dispersion[l, h] >=`` the ``spec.contextual_quantile``
  quantile (default the median) of layer ``l``'s heads — our documented threshold, not the paper's.

The statistics are also kept for two disjoint halves of the images (even / odd image index, all
batches), a noise floor for any difference between heads. Cached beside the other calibration files,
keyed by checkpoint hash + spec (``<model>_<sha256(hash)[:16]>_heads_<spec.key()>.pt``): ``torch.save``
of plain tensors and one JSON string, read back with ``weights_only=True`` (never unpickled).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tuner.calibration import CalibrationSpec
from tuner.calibration_head_summary import history_mass_of, scas_of
from tuner.policies.base import CacheGeometry

SCHEMA_VERSION = 1
TENSORS = ("mass", "dispersion_by_scale", "dispersion", "contextual", "mass_halves", "dispersion_halves")


@dataclass(frozen=True)
class HeadSpec:
    """What the head statistics are computed from (all of it is in the cache key)."""

    images: CalibrationSpec = CalibrationSpec()
    contextual_quantile: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.contextual_quantile <= 1.0:
            raise ValueError(f"contextual_quantile must be in [0, 1], got {self.contextual_quantile}")

    def key(self) -> str:
        """Stable short hash of the spec (with the schema version)."""
        doc = {"images": asdict(self.images), "contextual_quantile": self.contextual_quantile,
               "schema_version": SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class HeadStats:
    """Per-(layer, head) statistics of one model (definitions: the module docstring). CPU tensors:

    mass ``[L, H, S, S]`` float64 (query scale, source scale); dispersion_by_scale ``[L, H, S]``
    float64 (NaN where the history has < 2 tokens); dispersion ``[L, H]`` float64; contextual
    ``[L, H]`` bool; mass_halves ``[2, L, H, S, S]`` and dispersion_halves ``[2, L, H]``: the same on
    the even- and odd-indexed images (``half_images`` of each).
    """

    model_name: str
    geometry: CacheGeometry
    spec: HeadSpec
    mass: Any
    dispersion_by_scale: Any
    dispersion: Any
    contextual: Any
    mass_halves: Any
    dispersion_halves: Any
    half_images: tuple[int, int]
    checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        g = self.geometry
        n, h, s = g.num_layers, g.num_heads, g.num_scales
        want = {"mass": (n, h, s, s), "dispersion_by_scale": (n, h, s), "dispersion": (n, h),
                "contextual": (n, h), "mass_halves": (2, n, h, s, s), "dispersion_halves": (2, n, h)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"head stats {name} must be {list(shape)}, got {list(t.shape)}")
            if t.is_floating_point() == (name == "contextual"):
                raise ValueError(f"head stats {name} has the wrong dtype {t.dtype}")

    def history_mass(self):
        """``[L, H, S]``: mass that scale ``s``'s queries put on all earlier scales (0 at ``s = 0``)."""
        return history_mass_of(self.mass)

    def scas(self, sink_scales: int = 0):
        """HeatKV's S-CAS ``[L, H, S]`` (:func:`tuner.calibration_head_summary.scas_of`)."""
        return scas_of(self.mass, sink_scales)

    def check_geometry(self, geometry: CacheGeometry) -> None:
        if geometry != self.geometry:
            raise ValueError(f"head stats are for {self.geometry}, the model has {geometry}")

    def equal(self, other: "HeadStats") -> bool:
        """Same metadata and bit-identical tensors (NaN equal to NaN)."""
        import torch

        meta = ("model_name", "geometry", "spec", "half_images", "checkpoint_sha256")
        def same(a, b) -> bool:
            return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)) if a.is_floating_point() \
                else torch.equal(a, b)

        return all(getattr(self, k) == getattr(other, k) for k in meta) and all(
            same(getattr(self, k), getattr(other, k)) for k in TENSORS)

    # ------------------------------------------------------------------ (de)serialisation
    def save(self, path: str | Path) -> Path:
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"images": asdict(self.spec.images), "contextual_quantile": self.spec.contextual_quantile}
        meta = {"schema_version": SCHEMA_VERSION, "model_name": self.model_name,
                "geometry": self.geometry.to_dict(), "spec": spec,
                "half_images": list(self.half_images), "checkpoint_sha256": self.checkpoint_sha256}
        doc = {"meta": json.dumps(meta), **{k: getattr(self, k).contiguous() for k in TENSORS}}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(doc, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadStats":
        """Read a saved file (``weights_only=True``); ``ValueError`` on anything malformed."""
        import torch

        try:
            doc = torch.load(Path(path), map_location="cpu", weights_only=True)
            meta = json.loads(doc["meta"])
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"head stats schema_version must be {SCHEMA_VERSION}")
            g = meta["geometry"]
            geometry = CacheGeometry.from_dict(g)
            spec = HeadSpec(CalibrationSpec(**meta["spec"]["images"]),
                            float(meta["spec"]["contextual_quantile"]))
            tensors = {k: doc[k] for k in TENSORS}
            if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError("head stats entries must be tensors")
            a, b = (int(x) for x in meta["half_images"])
            return cls(str(meta["model_name"]), geometry, spec, **tensors, half_images=(a, b),
                       checkpoint_sha256=meta.get("checkpoint_sha256"))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed head stats {path}: {exc!r}") from None
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # not a safe torch file
            raise ValueError(f"cannot read head stats {path}: {exc}") from None


def contextual_split(dispersion, quantile: float):
    """``[L, H]`` bool: heads at or above their layer's ``quantile`` of ``dispersion`` (NaN: never)."""
    import torch

    out = torch.zeros(dispersion.shape, dtype=torch.bool)
    for layer, row in enumerate(dispersion):
        ok = ~row.isnan()
        if ok.any():
            out[layer] = ok & (row >= torch.quantile(row[ok], quantile))
    return out


def compute_head_stats(model, vae=None, model_cfg=None, spec: HeadSpec | None = None, *,
                       checkpoint_sha256: str | None = None, backend: str = "torch", dtype=None,
                       progress: Callable[[float, int], None] | None = None) -> HeadStats:
    """Generate ``spec.images``' calibration images with the full cache and measure the head statistics.

    ``model``: a loaded model, or the transformer with ``vae`` and ``model_cfg``
    (:func:`tuner.model.runner.as_runner`)."""
    from tuner.calibration import run_calibration_images
    from tuner.calibration_heads_observer import HeadStatsObserver
    from tuner.model.runner import as_runner

    runner = as_runner(model, vae, model_cfg)
    spec = spec or HeadSpec()
    obs = HeadStatsObserver(runner.config.geometry, softmax_scale=runner.softmax_scale)
    run_calibration_images(runner, spec=spec.images, observer=obs, progress=progress, backend=backend,
                           dtype=dtype)
    return stats_from(obs, runner.config.name, spec, checkpoint_sha256)


def stats_from(obs, model_name: str, spec: HeadSpec, checkpoint_sha256: str | None = None) -> HeadStats:
    """The :class:`HeadStats` of what a :class:`~tuner.calibration_heads_observer.HeadStatsObserver`
    saw, split by ``spec``'s rule."""
    measured = obs.finalize()
    return HeadStats(model_name, obs.geometry, spec, **measured,
                     contextual=contextual_split(measured["dispersion"], spec.contextual_quantile),
                     checkpoint_sha256=checkpoint_sha256)


def cache_path(model_cfg, checkpoint_sha256: str, spec: HeadSpec,
               cache_dir: str | Path | None = None) -> Path:
    """Where the head statistics of this checkpoint + spec live (beside the calibration statistics)."""
    from tuner.calibration import default_cache_dir, model_key

    name = f"{model_cfg.name}_{model_key(checkpoint_sha256)}_heads_{spec.key()}.pt"
    return Path(cache_dir or default_cache_dir()) / name


def head_stats(model, vae=None, model_cfg=None, *, checkpoint_sha256: str | None,
               spec: HeadSpec | None = None,
               cache_dir: str | Path | None = None, recompute: bool = False, backend: str = "torch",
               dtype=None,
               progress: Callable[[float, int], None] | None = None) -> HeadStats:
    """Cached :func:`compute_head_stats`, keyed by checkpoint hash + spec like the calibration statistics.

    ``checkpoint_sha256=None`` (random weights: nothing identifies them) computes without caching; a
    cached file for another geometry, spec or hash, or an unreadable one, is computed again and replaced.
    """
    from tuner.model.runner import as_runner

    runner = as_runner(model, vae, model_cfg)
    spec = spec or HeadSpec()
    geometry = runner.config.geometry
    path = cache_path(runner.config, checkpoint_sha256, spec, cache_dir) if checkpoint_sha256 else None
    if path is not None and path.is_file() and not recompute:
        try:
            stats = HeadStats.load(path)
            stats.check_geometry(geometry)
            if stats.spec == spec and stats.checkpoint_sha256 == checkpoint_sha256:
                return stats
        except ValueError:
            pass  # stale or corrupt: compute again below
    stats = compute_head_stats(model, vae, model_cfg, spec=spec, checkpoint_sha256=checkpoint_sha256,
                               backend=backend, dtype=dtype, progress=progress)
    if path is not None:
        stats.save(path)
    return stats
