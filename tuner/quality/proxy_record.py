"""What the zero-generation quality proxy replays: queries, keys and values of full-cache runs
(docs/design.md, Quality, "Zero-generation proxy"), recorded once per model and cached on disk.

A record holds, for ``spec.samples`` calibration images (labels spread over the classes, both CFG
rows of each), per layer:

- the keys and values of every token, ``[layers, R, H, L, D]`` (what any policy could keep);
- the queries, ``[layers, R, H, Lq, D]``: every query of every scale except the last (a score-based
  selection reads the current scale's queries, its observation window, so they must all be there for
  the replay to keep what the engine would), and of the last scale only the evaluated ones (nothing
  reads its keep decision, so no selection runs there);
- which queries the proxy evaluates per scale: all of a scale with at most
  ``spec.max_queries_per_scale`` tokens, else a seeded random subset of that many (the same subset
  for every row, head and layer).

R = 2 · samples rows (conditional, then unconditional, per batch), L = tokens of all scales.
Records are cached by checkpoint hash + spec next to the calibration statistics
(:func:`tuner.calibration.default_cache_dir`) as ``torch.save`` files of plain tensors, lists and one
JSON string, and loaded with ``weights_only=True`` (never unpickled).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tuner.options import SAMPLING
from tuner.policies.base import CacheGeometry

SCHEMA_VERSION = 1
STORE_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class ProxySpec:
    """How the proxy's full-cache runs are generated and sampled (all of it is in the cache key).

    ``store``: the dtype tensors are saved in (``fp16`` halves the file of a large model; the replay
    always computes in fp32 on what was stored, so the full cache still scores exactly 0).
    """

    samples: int = 4
    seed: int = 0
    cfg: float = SAMPLING.cfg
    top_k: int = SAMPLING.top_k
    top_p: float = SAMPLING.top_p
    batch_size: int = 4
    max_queries_per_scale: int = 64
    store: str = "fp32"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_queries_per_scale < 1:
            raise ValueError("proxy samples, batch_size and max_queries_per_scale must be >= 1")
        if self.store not in STORE_DTYPES:
            raise ValueError(f"proxy store dtype must be one of {', '.join(STORE_DTYPES)}, "
                             f"got {self.store!r}")

    def key(self) -> str:
        """Stable short hash of the spec (with the record's schema version)."""
        doc = {**asdict(self), "schema_version": SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def eval_indices(geometry: CacheGeometry, spec: ProxySpec) -> list[list[int]]:
    """Per scale, the sorted raster indices of the queries the proxy evaluates (seeded by ``spec.seed``)."""
    import torch

    out = []
    for s, n in enumerate(geometry.scale_lengths):
        m = spec.max_queries_per_scale
        if n <= m:
            out.append(list(range(n)))
            continue
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + s)
        out.append(sorted(torch.randperm(n, generator=gen)[:m].tolist()))
    return out


def stored_query_counts(geometry: CacheGeometry, spec: ProxySpec) -> list[int]:
    """Queries stored per scale: all of them, except the last scale's evaluated subset only."""
    counts = list(geometry.scale_lengths)
    counts[-1] = len(eval_indices(geometry, spec)[-1])
    return counts


@dataclass(frozen=True, eq=False)
class ProxyRecord:
    """Recorded full-cache attention inputs of one model (see the module docstring for the layout).

    keys, values: ``[layers, R, H, L, D]``; queries: ``[layers, R, H, Lq, D]`` (scale ``s`` at
    ``query_offsets[s]``, ``stored_query_counts`` of them); all on the CPU in the stored dtype.
    """

    model_name: str
    geometry: CacheGeometry
    spec: ProxySpec
    softmax_scale: float
    keys: Any
    values: Any
    queries: Any
    checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        g = self.geometry
        rows = self.keys.shape[1] if self.keys.dim() == 5 else -1
        want_kv = (g.num_layers, rows, g.num_heads, g.seq_len, g.head_dim)
        want_q = (g.num_layers, rows, g.num_heads, sum(stored_query_counts(g, self.spec)), g.head_dim)
        for name, t, want in (("keys", self.keys, want_kv), ("values", self.values, want_kv),
                              ("queries", self.queries, want_q)):
            if tuple(t.shape) != want:
                raise ValueError(f"proxy record {name} must be {list(want)}, got {list(t.shape)}")

    @property
    def rows(self) -> int:
        return int(self.keys.shape[1])

    @functools.cached_property
    def query_offsets(self) -> tuple[int, ...]:
        counts = stored_query_counts(self.geometry, self.spec)
        return tuple(sum(counts[:s]) for s in range(len(counts)))

    @functools.cached_property
    def eval_index(self) -> tuple[tuple[int, ...], ...]:
        """Per scale: raster indices of the evaluated queries (the last scale stores only these)."""
        return tuple(tuple(ix) for ix in eval_indices(self.geometry, self.spec))

    def check_geometry(self, geometry: CacheGeometry) -> None:
        """``ValueError`` if this record was made on a model of another cache geometry."""
        if geometry != self.geometry:
            raise ValueError(f"the proxy record is for {_describe(self.geometry)}, the model has "
                             f"{_describe(geometry)}; record the proxy for this model")

    def equal(self, other: "ProxyRecord") -> bool:
        """Same metadata and bit-identical tensors (records hold tensors, so ``==`` is not defined)."""
        import torch

        meta = ("model_name", "geometry", "spec", "softmax_scale", "checkpoint_sha256")
        return all(getattr(self, k) == getattr(other, k) for k in meta) and all(
            torch.equal(getattr(self, k), getattr(other, k)) for k in ("keys", "values", "queries"))

    # ------------------------------------------------------------------ (de)serialisation
    def save(self, path: str | Path) -> Path:
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"schema_version": SCHEMA_VERSION, "model_name": self.model_name,
                "geometry": self.geometry.to_dict(), "spec": asdict(self.spec),
                "softmax_scale": self.softmax_scale, "checkpoint_sha256": self.checkpoint_sha256}
        doc = {"meta": json.dumps(meta), "keys": self.keys.contiguous(), "values": self.values.contiguous(),
               "queries": self.queries.contiguous()}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(doc, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProxyRecord":
        """Read a saved record (``weights_only=True``); ``ValueError`` on anything malformed."""
        import torch

        try:
            doc = torch.load(Path(path), map_location="cpu", weights_only=True)
            meta = json.loads(doc["meta"])
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"proxy record schema_version must be {SCHEMA_VERSION}")
            g = meta["geometry"]
            geometry = CacheGeometry.from_dict(g)
            tensors = [doc[k] for k in ("keys", "values", "queries")]
            if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
                raise ValueError("proxy record tensors must be floating point")
            spec = ProxySpec(**meta["spec"])
            return cls(str(meta["model_name"]), geometry, spec, float(meta["softmax_scale"]), *tensors,
                       checkpoint_sha256=meta.get("checkpoint_sha256"))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed proxy record {path}: {exc!r}") from None
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # not a safe torch file
            raise ValueError(f"cannot read proxy record {path}: {exc}") from None


def _describe(g: CacheGeometry) -> str:
    return f"{g.num_layers} layers × {g.num_heads} heads × head_dim {g.head_dim} with {g.describe_scales()}"


class _Recorder:
    """Engine observer that copies each (layer, scale)'s queries and new keys/values into the record."""

    def __init__(self, geometry: CacheGeometry, spec: ProxySpec, rows: int, dtype):
        import torch

        g = self.g = geometry
        self.counts = stored_query_counts(g, spec)
        self.q_off = [sum(self.counts[:s]) for s in range(g.num_scales)]
        self.last_index = torch.tensor(eval_indices(g, spec)[-1], dtype=torch.int64)
        self.k = torch.zeros(g.num_layers, rows, g.num_heads, g.seq_len, g.head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.q = torch.zeros(g.num_layers, rows, g.num_heads, sum(self.counts), g.head_dim, dtype=dtype)
        self.row0 = 0  # first record row of the batch being generated

    def __call__(self, layer: int, scale: int, q, k_all, v_all, positions) -> None:
        g = self.g
        start, n = g.scale_starts[scale], g.scale_lengths[scale]
        rows = slice(self.row0, self.row0 + q.shape[0])
        # The full cache's candidates end with the current scale's tokens (positions start..start+n).
        self.k[layer, rows, :, start:start + n] = k_all[:, :, -n:].detach().to("cpu", self.k.dtype)
        self.v[layer, rows, :, start:start + n] = v_all[:, :, -n:].detach().to("cpu", self.v.dtype)
        if scale == g.num_scales - 1:
            q = q.index_select(2, self.last_index.to(q.device))
        off = self.q_off[scale]
        self.q[layer, rows, :, off:off + self.counts[scale]] = q.detach().to("cpu", self.q.dtype)


def record_proxy(model, vae=None, model_cfg=None, spec: ProxySpec | None = None, *, backend: str = "torch",
                 checkpoint_sha256: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ProxyRecord:
    """Generate ``spec.samples`` images with the full cache (fp32) and record what the proxy replays.

    ``model``: a loaded model, or the transformer with ``vae`` and ``model_cfg``
    (:func:`tuner.model.runner.as_runner`). Batch ``j`` of ``spec.batch_size`` conditions is sampled
    with seed ``spec.seed + j`` (spread over the classes or prompts like the calibration's).
    ``progress(done, total)`` is called after every batch.
    """
    import torch

    from tuner.calibration import calibration_labels
    from tuner.model.runner import as_runner
    from tuner.policies.full import FullPolicy

    runner = as_runner(model, vae, model_cfg)
    spec = spec or ProxySpec(**runner.config.sampling.as_kwargs())
    geometry = runner.config.geometry
    dtype = torch.float16 if spec.store == "fp16" else torch.float32
    rec = _Recorder(geometry, spec, 2 * spec.samples, dtype)
    labels = torch.tensor(calibration_labels(runner.num_conditions, spec.samples))
    for j, chunk in enumerate(torch.split(labels, spec.batch_size)):
        runner.generate_chunk(chunk, seed=spec.seed + j, cfg=spec.cfg, top_k=spec.top_k, top_p=spec.top_p,
                              policy=FullPolicy(), backend=backend, dtype=torch.float32, observer=rec)
        rec.row0 += 2 * len(chunk)
        if progress is not None:
            progress(rec.row0 // 2, spec.samples)
    return ProxyRecord(runner.config.name, geometry, spec, runner.softmax_scale, rec.k, rec.v, rec.q,
                       checkpoint_sha256=checkpoint_sha256)


def cache_path(model_cfg, checkpoint_sha256: str, spec: ProxySpec,
               cache_dir: str | Path | None = None) -> Path:
    """Where the record of this checkpoint + spec lives (beside the calibration statistics)."""
    from tuner.calibration import default_cache_dir, model_key

    name = f"{model_cfg.name}_{model_key(checkpoint_sha256)}_proxy_{spec.key()}.pt"
    return Path(cache_dir or default_cache_dir()) / name


def load_or_record_proxy(model, vae=None, model_cfg=None, *, checkpoint_sha256: str | None,
                         spec: ProxySpec | None = None,
                         backend: str = "torch", progress: Callable[[int, int], None] | None = None,
                         cache_dir: str | Path | None = None, recompute: bool = False) -> ProxyRecord:
    """Cached :func:`record_proxy`, keyed by checkpoint hash + spec (like the calibration statistics).

    ``checkpoint_sha256=None`` (random weights) records without caching; a cached file for another
    model, geometry or spec (or an unreadable one) is recorded again and replaced.
    """
    from tuner.model.runner import as_runner

    runner = as_runner(model, vae, model_cfg)
    spec = spec or ProxySpec(**runner.config.sampling.as_kwargs())
    geometry = runner.config.geometry
    path = cache_path(runner.config, checkpoint_sha256, spec, cache_dir) if checkpoint_sha256 else None
    if path is not None and path.is_file() and not recompute:
        try:
            record = ProxyRecord.load(path)
            record.check_geometry(geometry)
            if record.spec == spec and record.checkpoint_sha256 == checkpoint_sha256:
                return record
        except ValueError:
            pass  # stale or corrupt: record again below
    record = record_proxy(model, vae, model_cfg, spec=spec, backend=backend,
                          checkpoint_sha256=checkpoint_sha256, progress=progress)
    if path is not None:
        record.save(path)
    return record
