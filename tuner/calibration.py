"""Calibration statistics of a model, computed once from full-cache runs and cached on disk.

Three statistics per layer, measured on the queries/keys of generations with the full cache
(classifier-free guidance rows, conditional and unconditional, all averaged):

- **inter-scale key similarity** ``key_similarity[l][s]`` (AMS-KV): keys of scale ``s-1``, laid out
  on their ``h × w`` grid and bilinearly upsampled to scale ``s``'s grid, against scale ``s``'s keys:
  minus the L2 distance per token, averaged over tokens, heads and rows (``None`` for ``s = 0``).
- **attention selectivity** (ScaleKV): ``car[l][s]`` = mean over the queries of scale ``s`` of the
  softmax mass on scale ``s``'s own keys; ``htk[l][s]`` = mean over the queries of the mass of the
  ``K'`` largest attention weights on the history (scales ``< s``), ``K' = max(1, ceil(htk_fraction ·
  history))`` — the paper leaves ``K'`` open; we tie it to the ~10% budgets it targets. Both are
  averaged over queries, heads and rows, then ``asi = car · htk`` (``None`` for ``s = 0``).
- **attention density** ``density[l][j][i]`` (AMS-KV): attention mass that all queries of scale ``j``
  put on the keys of scale ``i``, divided by ``T_i`` (tokens of scale ``i``); per head and row,
  then averaged. ``sum_i density[l][j][i] · T_i = T_j``.

The observer computes softmax attention in query chunks (fp32) so the attention matrix of a large
scale is never materialised whole. What ``tuner calibrate`` prints and saves from these statistics
lives in :mod:`tuner.calibration_report`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from tuner.calibration_head_summary import HeadCalibration
from tuner.calibration_heads_observer import QUERY_CHUNK_ELEMENTS, HeadStatsObserver
from tuner.errors import UserError
from tuner.options import SAMPLING
from tuner.policies.base import CacheGeometry

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CalibrationSpec:
    """How the calibration images are generated (part of the cache key)."""

    samples: int = 16
    seed: int = 0
    cfg: float = SAMPLING.cfg
    top_k: int = SAMPLING.top_k
    top_p: float = SAMPLING.top_p
    batch_size: int = 8
    htk_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("calibration samples and batch_size must be >= 1")
        if not 0.0 < self.htk_fraction <= 1.0:
            raise ValueError(f"htk_fraction must be in (0, 1], got {self.htk_fraction}")

    def key(self) -> str:
        """Stable short hash of the spec."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


Table = tuple[tuple[float | None, ...], ...]


@dataclass(frozen=True)
class Calibration:
    """Calibration statistics of one model (see the module docstring for the definitions).

    Attributes
    ----------
    key_similarity, car, htk: ``[num_layers][num_scales]`` floats (``None`` at scale 0).
    density: ``[num_layers][query scale][key scale]`` floats (0 above the diagonal).
    heads: the per-(layer, head) summary head-aware policies plan from
           (:class:`tuner.calibration_head_summary.HeadCalibration`), measured in the same pass;
           ``None`` in statistics saved before it existed (such policies then ask for a recalibration).
    scale_shapes: ``(h, w)`` per scale for a non-square schedule (``patch_nums`` the heights), else None
           (absent from the JSON: square statistics read and write as they always have).
    """

    model_name: str
    patch_nums: tuple[int, ...]
    num_layers: int
    key_similarity: Table
    car: Table
    htk: Table
    density: tuple[tuple[tuple[float, ...], ...], ...]
    spec: CalibrationSpec
    checkpoint_sha256: str | None = None
    heads: Any = None
    scale_shapes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        geometry = CacheGeometry(self.num_layers, 1, 1, tuple(self.patch_nums), self.scale_shapes)
        object.__setattr__(self, "scale_shapes", geometry.scale_shapes)  # None when every map is square
        s, n = len(self.patch_nums), self.num_layers
        for name in ("key_similarity", "car", "htk"):
            table = getattr(self, name)
            if len(table) != n or any(len(row) != s for row in table):
                raise ValueError(f"calibration {name} must be {n} layers × {s} scales")
        if len(self.density) != n or any(len(m) != s or any(len(r) != s for r in m) for m in self.density):
            raise ValueError(f"calibration density must be {n} layers × {s} × {s} scales")
        if self.heads is not None and (self.heads.num_layers, self.heads.num_scales) != (n, s):
            raise ValueError(f"calibration heads must be {n} layers × heads × {s} scales")

    @property
    def asi(self) -> Table:
        """``[num_layers][num_scales]`` attention selectivity index ``car · htk`` (``None`` at scale 0)."""
        return tuple(tuple(None if c is None or h is None else c * h for c, h in zip(cr, hr))
                     for cr, hr in zip(self.car, self.htk))

    def asi_z(self, eps: float = 1e-8) -> Table:
        """ASI z-normalised over layers, separately per scale (``None`` at scale 0)."""
        asi = self.asi
        out = [[None] * len(self.patch_nums) for _ in range(self.num_layers)]
        for s in range(len(self.patch_nums)):
            col = [row[s] for row in asi]
            if any(v is None for v in col):
                continue
            mu = sum(col) / len(col)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in col) / len(col))
            for layer, v in enumerate(col):
                out[layer][s] = (v - mu) / (sigma + eps)
        return tuple(tuple(row) for row in out)

    def layer_similarity(self) -> tuple[float, ...]:
        """Per layer: mean key similarity over scales ``1..S-1`` (AMS-KV's demanding-layer test)."""
        out = []
        for row in self.key_similarity:
            vals = [v for v in row if v is not None]
            out.append(sum(vals) / len(vals) if vals else 0.0)
        return tuple(out)

    def check_geometry(self, geometry: CacheGeometry) -> None:
        """``ValueError`` if these statistics were computed for another layer/scale layout."""
        mine = CacheGeometry(self.num_layers, 1, 1, tuple(self.patch_nums), self.scale_shapes)
        theirs = CacheGeometry(geometry.num_layers, 1, 1, tuple(geometry.patch_nums), geometry.scale_shapes)
        if mine != theirs:
            raise ValueError(f"calibration is for {self.num_layers} layers with {mine.describe_scales()}, "
                             f"the model has {geometry.num_layers} layers with {theirs.describe_scales()}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("heads", "scale_shapes")}
        if self.scale_shapes is not None:  # non-square maps only: square files are as they were
            d["scale_shapes"] = [list(hw) for hw in self.scale_shapes]
        if self.heads is not None:  # absent, not null, without heads: files read as they always have
            d["heads"] = self.heads.to_dict()
        d.update(schema_version=SCHEMA_VERSION, patch_nums=list(self.patch_nums), spec=asdict(self.spec),
                 asi=self.asi)
        return json.loads(json.dumps(d))  # tuples -> lists

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        """Rebuild from :meth:`to_dict` output; ``ValueError`` on anything malformed."""
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"calibration schema_version must be {SCHEMA_VERSION}")
        try:
            def table(rows):
                return tuple(tuple(None if v is None else float(v) for v in row) for row in rows)

            return cls(model_name=str(d["model_name"]), patch_nums=tuple(int(p) for p in d["patch_nums"]),
                       num_layers=int(d["num_layers"]), key_similarity=table(d["key_similarity"]),
                       car=table(d["car"]), htk=table(d["htk"]),
                       density=tuple(tuple(tuple(float(v) for v in r) for r in m) for m in d["density"]),
                       spec=CalibrationSpec(**d["spec"]), checkpoint_sha256=d.get("checkpoint_sha256"),
                       heads=None if d.get("heads") is None else HeadCalibration.from_dict(d["heads"]),
                       scale_shapes=None if d.get("scale_shapes") is None
                       else tuple((int(h), int(w)) for h, w in d["scale_shapes"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed calibration data: {exc!r}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)  # atomic: concurrent workers never read a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read calibration file {path}: {exc}; delete it and run "
                            f"`tuner calibrate` again") from None


class CalibrationObserver:
    """Engine observer (``generate(..., observer=obs)``) that accumulates the statistics.

    Call signature: ``obs(layer, scale, q [R, H, n_s, d], k_all [R, H, n, d], v_all, positions [R, H, n])``
    with ``k_all`` holding every token of scales ``<= scale`` (full policy) and ``q`` as used in
    attention (``softmax_scale`` is the factor the model applies to ``q·k``, 1.0 for VAR).
    """

    def __init__(self, geometry: CacheGeometry, *, model_name: str = "", spec: CalibrationSpec | None = None,
                 checkpoint_sha256: str | None = None, softmax_scale: float = 1.0,
                 chunk_elements: int = QUERY_CHUNK_ELEMENTS):
        self.geometry, self.model_name = geometry, model_name
        self.spec = spec or CalibrationSpec()
        self.checkpoint_sha256, self.softmax_scale = checkpoint_sha256, softmax_scale
        self.chunk_elements = chunk_elements
        n, s = geometry.num_layers, geometry.num_scales
        self._sums = {k: [[0.0] * s for _ in range(n)] for k in ("sim", "car", "htk")}
        self._counts = {k: [[0] * s for _ in range(n)] for k in ("sim", "car", "htk")}
        self._density = [[[0.0] * s for _ in range(s)] for _ in range(n)]
        self._density_count = [[0] * s for _ in range(n)]

    def __call__(self, layer: int, scale: int, q, k_all, v_all, positions) -> None:
        import torch

        # Statistics in fp32 even when the run uses fp16/bf16 autocast.
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            self._observe(layer, scale, q.float(), k_all.float(), positions)

    def _observe(self, layer: int, scale: int, q, k, positions) -> None:
        import torch

        g = self.geometry
        r, h, n_s, _ = q.shape
        ends = torch.tensor([g.tokens_through(i) for i in range(g.num_scales)], device=k.device)
        key_scale = torch.bucketize(positions[0, 0].to(k.device), ends, right=True)  # [n]
        cur = (key_scale == scale).nonzero().flatten()
        hist = (key_scale < scale).nonzero().flatten()
        n_hist = int(hist.numel())
        top = max(1, math.ceil(self.spec.htk_fraction * n_hist)) if n_hist else 0
        mass = torch.zeros(r, h, k.shape[2], device=k.device)
        car = torch.zeros(r, h, device=k.device)
        htk = torch.zeros(r, h, device=k.device)
        chunk = max(1, self.chunk_elements // max(1, r * h * k.shape[2]))
        for c0 in range(0, n_s, chunk):
            attn = torch.softmax(q[:, :, c0:c0 + chunk] @ k.transpose(-1, -2) * self.softmax_scale, dim=-1)
            mass += attn.sum(dim=2)
            car += attn.index_select(-1, cur).sum(-1).sum(-1)
            if n_hist:
                htk += attn.index_select(-1, hist).topk(top, dim=-1).values.sum(-1).sum(-1)
        self._add("car", layer, scale, (car / n_s).sum().item(), r * h)
        if n_hist:
            self._add("htk", layer, scale, (htk / n_s).sum().item(), r * h)
        for i in range(scale + 1):
            on_i = mass.index_select(-1, (key_scale == i).nonzero().flatten()).sum(-1) / g.scale_lengths[i]
            self._density[layer][scale][i] += on_i.sum().item()
        self._density_count[layer][scale] += r * h
        if scale > 0:
            self._add("sim", layer, scale, self._similarity(k, key_scale, scale).item(), r * h)

    def _similarity(self, k, key_scale, scale: int):
        """Sum over rows and heads of minus the mean L2 distance (upsampled scale-1 keys vs scale keys)."""
        import torch.nn.functional as F

        r, h, _, d = k.shape
        (ph, pw), (sh, sw) = self.geometry.shapes[scale - 1], self.geometry.shapes[scale]
        prev = k.index_select(2, (key_scale == scale - 1).nonzero().flatten())
        cur = k.index_select(2, (key_scale == scale).nonzero().flatten())
        grid = prev.reshape(r * h, ph, pw, d).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=(sh, sw), mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1).reshape(r, h, sh * sw, d)
        return -(up - cur).norm(dim=-1).mean(-1).sum()

    def _add(self, key: str, layer: int, scale: int, value: float, count: int) -> None:
        self._sums[key][layer][scale] += value
        self._counts[key][layer][scale] += count

    def _table(self, key: str) -> Table:
        return tuple(tuple(None if c == 0 else v / c for v, c in zip(vr, cr))
                     for vr, cr in zip(self._sums[key], self._counts[key]))

    def finalize(self) -> Calibration:
        """The averaged statistics; ``ValueError`` if some layer or scale was never observed."""
        g = self.geometry
        if any(c == 0 for row in self._density_count for c in row):
            raise ValueError("calibration observed no attention for some (layer, scale); was the full policy "
                             "used?")
        car = tuple(tuple(None if s == 0 else v for s, v in enumerate(row)) for row in self._table("car"))
        density = tuple(tuple(tuple(v / self._density_count[layer][j] for v in row)
                              for j, row in enumerate(m))
                        for layer, m in enumerate(self._density))
        return Calibration(self.model_name, tuple(g.patch_nums), g.num_layers, self._table("sim"), car,
                           self._table("htk"), density, self.spec, self.checkpoint_sha256,
                           scale_shapes=g.scale_shapes)


# ---------------------------------------------------------------------------------------- running it
def calibration_labels(num_classes: int, samples: int) -> list[int]:
    """Class ids spread evenly over all classes (not the first ``samples`` consecutive ones)."""
    return [(i * num_classes) // samples for i in range(samples)]


def calibrate(model, vae=None, model_cfg=None, samples: int = 16, seed: int = 0,
              progress: Callable[[float, int], None] | None = None, *, spec: CalibrationSpec | None = None,
              checkpoint_sha256: str | None = None, backend: str = "torch", dtype=None,
              progress_per_scale: bool = False) -> Calibration:
    """Generate ``samples`` images with the full cache and return their statistics.

    ``model``: a loaded model (VAR or Infinity, :func:`tuner.model.runner.as_runner`), or the
    transformer with ``vae`` and ``model_cfg``. ``spec`` overrides ``samples``/``seed``; the images and
    ``progress``/``progress_per_scale`` are :func:`run_calibration_images`'.
    """
    from tuner.model.runner import as_runner

    runner = as_runner(model, vae, model_cfg)
    spec = spec or CalibrationSpec(samples=samples, seed=seed, **runner.config.sampling.as_kwargs())
    geometry, softmax_scale = runner.config.geometry, runner.softmax_scale
    obs = CalibrationObserver(geometry, model_name=runner.config.name, spec=spec,
                              checkpoint_sha256=checkpoint_sha256, softmax_scale=softmax_scale)
    heads = HeadStatsObserver(geometry, softmax_scale=softmax_scale)
    run_calibration_images(runner, spec=spec, observer=_Both(obs, heads), progress=progress, backend=backend,
                           dtype=dtype, progress_per_scale=progress_per_scale)
    measured = heads.finalize()
    summary = HeadCalibration.from_measured(measured["mass"], measured["dispersion"])
    return replace(obs.finalize(), heads=summary)


class _Both:
    """One engine observer that feeds two (the per-layer and the per-head statistics, one generation)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, *args) -> None:
        self.first(*args)
        self.second(*args)


def softmax_scale_of(var) -> float:
    """The factor a VAR transformer applies to ``q·k`` before the softmax (what an observer must use
    too; a loaded model's ``softmax_scale`` says it for any kind)."""
    return float(getattr(var.blocks[0].attn, "softmax_scale", 1.0))


def run_calibration_images(model, vae=None, model_cfg=None, spec: CalibrationSpec | None = None,
                           observer=None, progress: Callable[[float, int], None] | None = None, *,
                           backend: str = "torch", dtype=None, progress_per_scale: bool = False) -> None:
    """Generate ``spec``'s calibration images with the full cache, ``observer`` watching every attention.

    ``model``: a loaded model, or the transformer with ``vae`` and ``model_cfg`` (as :func:`calibrate`);
    labels are condition indices (classes for VAR, prompts of the built-in set for Infinity).

    ``observer(layer, scale, q, k_all, v_all, positions)`` is the engine's hook (see
    :class:`CalibrationObserver`); every per-model statistic computed from full-cache runs
    (:func:`calibrate`, :mod:`tuner.calibration_heads`) runs on these same images. Labels are
    :func:`calibration_labels`; batch ``j`` of ``spec.batch_size`` is sampled with seed ``spec.seed + j``
    (rows: the batch's conditional rows, then its unconditional ones). ``progress(done, total)`` is
    called after every batch with the images done (an int). With ``progress_per_scale`` it is also
    called after every scale of a batch, ``done`` then a float: the images of the finished batches
    plus the current batch's share of its tokens generated so far (a batch's images come out together,
    so a scale is the finest step there is; tokens are a rough proxy for the time, which the last
    scales dominate too).
    """
    import torch

    from tuner.model.runner import as_runner
    from tuner.policies.full import FullPolicy

    runner = as_runner(model, vae, model_cfg)
    spec = spec or CalibrationSpec(**runner.config.sampling.as_kwargs())
    geometry = runner.config.geometry
    labels = torch.tensor(calibration_labels(runner.num_conditions, spec.samples))
    done = 0
    for j, chunk in enumerate(torch.split(labels, spec.batch_size)):
        watcher = observer
        if progress is not None and progress_per_scale:
            watcher = _ScaleProgress(observer, geometry, done, len(chunk), spec.samples, progress)
        runner.generate_chunk(chunk, seed=spec.seed + j, cfg=spec.cfg, top_k=spec.top_k, top_p=spec.top_p,
                              policy=FullPolicy(), backend=backend, dtype=dtype or torch.float32,
                              observer=watcher)
        done += len(chunk)
        if progress is not None:
            progress(done, spec.samples)


class _ScaleProgress:
    """Observer wrapper: forwards every call to ``obs``; after the last layer of each scale but the
    batch's last, reports ``progress(before + batch · tokens so far / L, total)`` (the batch's end is
    reported by :func:`run_calibration_images` itself, as an int)."""

    def __init__(self, obs, geometry: CacheGeometry, before: int, batch: int, total: int,
                 progress: Callable[[float, int], None]):
        self.obs, self.geometry, self.progress = obs, geometry, progress
        self.before, self.batch, self.total = before, batch, total

    def __call__(self, layer: int, scale: int, *tensors) -> None:
        self.obs(layer, scale, *tensors)
        g = self.geometry
        if layer == g.num_layers - 1 and scale < g.num_scales - 1:
            share = g.tokens_through(scale) / g.tokens_through(g.num_scales - 1)
            self.progress(self.before + self.batch * share, self.total)


def default_cache_dir() -> Path:
    """``$TUNER_CACHE_DIR/calibration`` if set, else ``~/.cache/varkv-tuner/calibration``."""
    root = os.environ.get("TUNER_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "varkv-tuner") / "calibration"


def model_key(checkpoint_sha256: str) -> str:
    """The short checkpoint part of a cache file name (shared by every per-model cache in this dir)."""
    return hashlib.sha256(checkpoint_sha256.encode()).hexdigest()[:16]


def cache_path(model_cfg, checkpoint_sha256: str, spec: CalibrationSpec,
               cache_dir: str | Path | None = None) -> Path:
    """Where the statistics of this checkpoint + spec live."""
    key = model_key(checkpoint_sha256)
    return Path(cache_dir or default_cache_dir()) / f"{model_cfg.name}_{key}_{spec.key()}.json"


def load_or_compute_calibration(model, vae=None, model_cfg=None, *, checkpoint_sha256: str | None,
                                spec: CalibrationSpec | None = None, cache_dir: str | Path | None = None,
                                progress: Callable[[float, int], None] | None = None, recompute: bool = False,
                                backend: str = "torch", dtype=None,
                                progress_per_scale: bool = False) -> Calibration:
    """Cached :func:`calibrate`, keyed by checkpoint hash + spec (``progress``, ``progress_per_scale``:
    as there; not called when the cache answers).

    ``checkpoint_sha256=None`` (random weights: nothing identifies them) computes without caching; any
    other string (e.g. ``"random:seed 0"``) works as a key. A cached file for another model or spec
    (or an unreadable one) is recomputed and replaced.
    """
    from tuner.model.runner import as_runner

    runner = as_runner(model, vae, model_cfg)
    spec = spec or CalibrationSpec(**runner.config.sampling.as_kwargs())
    geometry = runner.config.geometry
    path = cache_path(runner.config, checkpoint_sha256, spec, cache_dir) if checkpoint_sha256 else None
    if path is not None and path.is_file() and not recompute:
        try:
            cal = Calibration.from_dict(json.loads(path.read_text()))
            cal.check_geometry(geometry)
            if cal.spec == spec and cal.checkpoint_sha256 == checkpoint_sha256 and cal.heads is not None:
                return cal  # (saved before the per-head summary existed: recomputed below)
        except (OSError, ValueError):
            pass  # stale or corrupt: recompute below
    cal = calibrate(model, vae, model_cfg, spec=spec, progress=progress, checkpoint_sha256=checkpoint_sha256,
                    backend=backend, dtype=dtype, progress_per_scale=progress_per_scale)
    if path is not None:
        cal.save(path)
    return cal
