"""Zero-generation quality proxy: how much attention output a policy's kept set loses, per layer and
scale, replayed over recorded full-cache runs (docs/design.md, Quality, "Zero-generation proxy").

For a candidate policy the replay drives the engine's own :class:`~tuner.model.cache.KVCache` with
the recorded keys and values instead of model-computed ones (teacher forcing: every layer sees the
full-cache run's inputs), so the kept tokens, their compaction and their int8/int4 quantization are
exactly what the engine would do. At every (layer ``l``, scale ``s``) it measures, on the evaluated
queries of :mod:`tuner.quality.proxy_record`:

- ``errors[l][s]`` = ``‖attn(q, K_kept, V_kept) − attn(q, K_full, V_full)‖ / ‖attn(q, K_full, V_full)‖``
  (Frobenius norms over rows, heads, queries and channels; kept K/V as the cache reads them, i.e.
  dequantized), and
- ``lost[l][s]`` = mean over rows, heads and queries of the full-cache softmax mass on the history
  tokens the policy no longer holds.

The ``score`` (:data:`SCORE`, ``mean_error``) is the mean of ``errors[l][s]`` over layers and the scales
that read a cache (``s >= 1``): 0 for the full cache, lower is better. It was chosen among
:data:`AGGREGATIONS` by Spearman ρ with held-out PSNR (experiments/search/proxy_rank.md).

Attention is the PyTorch reference's (CPU or GPU): the replay attends fewer queries than a scale has
tokens, which the fused kernel does not take.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from tuner.policies.base import KVPolicy, PolicySpec
from tuner.quality.proxy_record import (ProxyRecord, ProxySpec, cache_path, load_or_record_proxy,
                                        record_proxy, stored_query_counts)

__all__ = ["AGGREGATIONS", "SCORE", "ProxyRecord", "ProxyScore", "ProxySpec", "aggregate", "cache_path",
           "load_or_record_proxy", "proxy_score", "record_proxy"]

Table = tuple[tuple[float, ...], ...]


def _mean(table: Table, weights: Sequence[float], f: Callable[[float], float] = float) -> float:
    """``Σ_s w_s · mean_l f(table[l][s]) / Σ_s w_s``."""
    cols = [sum(f(row[s]) for row in table) / len(table) for s in range(len(weights))]
    return sum(w * c for w, c in zip(weights, cols)) / sum(weights)


def _weights(n_tokens: Sequence[int], how: str) -> list[float]:
    """Per-scale weights: 0 for scale 0 (it reads no cache), else uniform, by tokens, or by 1/tokens."""
    return [0.0 if s == 0 else {"uniform": 1.0, "tokens": float(n), "inverse": 1.0 / n}[how]
            for s, n in enumerate(n_tokens)]


def _log(floor: float) -> Callable[[float], float]:
    """``log(1 + e / floor)``: 0 for no error, linear well below ``floor``, logarithmic above it."""
    return lambda e: math.log1p(e / floor)


#: name -> f(errors [layer][scale], lost [layer][scale], tokens per scale) -> float (lower = better).
AGGREGATIONS: dict[str, Callable[[Table, Table, Sequence[int]], float]] = {
    "mean_error": lambda e, m, n: _mean(e, _weights(n, "uniform")),
    "mean_error_tokens": lambda e, m, n: _mean(e, _weights(n, "tokens")),
    "mean_error_early": lambda e, m, n: _mean(e, _weights(n, "inverse")),
    "rms_error": lambda e, m, n: math.sqrt(_mean(e, _weights(n, "uniform"), lambda x: x * x)),
    "mean_log_error": lambda e, m, n: _mean(e, _weights(n, "uniform"), _log(1e-2)),
    "mean_log_error_tokens": lambda e, m, n: _mean(e, _weights(n, "tokens"), _log(1e-2)),
    "mean_log_error_fine": lambda e, m, n: _mean(e, _weights(n, "uniform"), _log(1e-4)),
    "max_error": lambda e, m, n: max(max(row[1:]) for row in e),
    "mean_lost_mass": lambda e, m, n: _mean(m, _weights(n, "uniform")),
    "mean_lost_mass_tokens": lambda e, m, n: _mean(m, _weights(n, "tokens")),
}
SCORE = "mean_error"  # chosen by ρ with held-out PSNR on tiny (experiments/search/proxy_rank.md)


def aggregate(errors: Table, lost: Table, n_tokens: Sequence[int], how: str = SCORE) -> float:
    """One of :data:`AGGREGATIONS` over per-(layer, scale) tables; ``ValueError`` for an unknown name."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown proxy aggregation {how!r}; known: {', '.join(AGGREGATIONS)}")
    return float(AGGREGATIONS[how](errors, lost, n_tokens))


@dataclass(frozen=True)
class ProxyScore:
    """The proxy's verdict on one policy (lower = better predicted quality).

    errors, lost: ``[layer][scale]`` relative attention-output error and lost full-cache mass (0 at
    scale 0, which reads no cache). per_layer: :data:`SCORE` over one layer's row; per_scale: mean
    relative error over layers; lost_mass: mean of ``lost`` over layers and scales ``>= 1``.
    """

    score: float
    per_layer: tuple[float, ...]
    per_scale: tuple[float, ...]
    lost_mass: float
    errors: Table
    lost: Table


@dataclass
class _Reference:
    """The full cache replayed once per record: outputs ``[R, H, m_s, D]`` and the mean softmax mass of
    the evaluated queries on each history token ``[R, H, T_{s-1}]``, per layer and scale."""

    outputs: list[list]
    history_mass: list[list]


def replay(record: ProxyRecord, policy: KVPolicy, policy_spec: PolicySpec, *, backend: str = "torch",
           device=None, on_attend: Callable | None = None) -> list[list]:
    """Drive a :class:`~tuner.model.cache.KVCache` planned by ``policy`` with the recorded K/V.

    Returns ``outputs[layer][scale]``, the attention output of the evaluated queries ``[R, H, m_s, D]``
    (fp32). ``on_attend(layer, scale, kept)`` is called before each attention with the global ids
    ``[R, H, n]`` the layer holds (None for the full layout, which holds everything; per-head plans:
    ``-1`` after a head's own ids).
    """
    import torch

    from varkv_kernels.reference import kv_attention_reference
    from tuner.model.cache import KVCache

    g = record.geometry
    record.check_geometry(policy_spec.geometry)
    plan = policy.plan(policy_spec)
    if not plan.full:  # nothing reads the last scale's keep decision: skip its selection
        heads = tuple(per_scale[:-1] + ((0,) * g.num_heads,) for per_scale in plan.head_budgets)
        plan = dataclasses.replace(plan, budgets=tuple(row[:-1] + (0,) for row in plan.budgets),
                                   head_budgets=heads)
    device = torch.device(device or record.keys.device)
    current = {}

    def attention(q, kb, vb, lens, kn, vn, scale, *, backend, uniform_len):
        # The cache hands over every stored query (a selection may read them); only the evaluated
        # ones are attended.
        return kv_attention_reference(q.index_select(2, current["index"]), kb, vb, lens, kn, vn, scale,
                                      uniform_len=uniform_len)

    cache = KVCache(plan, g, rows=record.rows, dtype=torch.float32, device=device, policy=policy,
                    attention=attention, backend=backend)
    keys, values, queries = (t.to(device, torch.float32)
                             for t in (record.keys, record.values, record.queries))
    counts = stored_query_counts(g, record.spec)
    outputs = [[None] * g.num_scales for _ in range(g.num_layers)]
    for s in range(g.num_scales):
        cache.begin_scale(s)
        start, n = g.scale_starts[s], g.scale_lengths[s]
        off, cnt = record.query_offsets[s], counts[s]
        last = s == g.num_scales - 1
        index = range(cnt) if last else record.eval_index[s]  # the last scale stores only these
        current["index"] = torch.tensor(index, dtype=torch.int64, device=device)
        for layer in range(g.num_layers):
            if on_attend is not None:
                on_attend(layer, s, None if plan.full else cache.kept_positions(layer)[0])
            outputs[layer][s] = cache.attend(layer, queries[layer, :, :, off:off + cnt],
                                             keys[layer, :, :, start:start + n],
                                             values[layer, :, :, start:start + n], record.softmax_scale)
    return outputs


def _reference(record: ProxyRecord, backend: str, device) -> _Reference:
    """The full cache's replay, computed once per record and kept on it."""
    import torch

    from tuner.policies.full import FullPolicy

    cached = record.__dict__.get("_proxy_reference")
    if cached is not None and cached[0] == str(device):
        return cached[1]
    g = record.geometry
    outputs = replay(record, FullPolicy(), PolicySpec(g, record.model_name), backend=backend, device=device)
    keys = record.keys.to(outputs[0][0].device, torch.float32)
    counts = stored_query_counts(g, record.spec)
    mass = [[None] * g.num_scales for _ in range(g.num_layers)]
    for s in range(g.num_scales):
        off, hist, through = record.query_offsets[s], g.tokens_through(s - 1), g.tokens_through(s)
        index = list(range(counts[s])) if s == g.num_scales - 1 else list(record.eval_index[s])
        for layer in range(g.num_layers):
            q = record.queries[layer, :, :, off:off + counts[s]][:, :, index].to(keys.device, torch.float32)
            logits = q @ keys[layer, :, :, :through].transpose(-1, -2) * record.softmax_scale
            p = torch.softmax(logits, dim=-1)
            mass[layer][s] = p[..., :hist].mean(dim=2)
    ref = _Reference(outputs, mass)
    object.__setattr__(record, "_proxy_reference", (str(device), ref))  # derived data, not a field
    return ref


def proxy_score(record: ProxyRecord, policy: KVPolicy, policy_spec: PolicySpec, *, backend: str = "torch",
                device=None) -> ProxyScore:
    """Score ``policy`` (planned against ``policy_spec``, which carries its calibration) on ``record``.

    ``ValueError`` when the spec's geometry is not the record's, or the policy cannot plan.
    """
    import torch

    g = record.geometry
    record.check_geometry(policy_spec.geometry)
    ref = _reference(record, backend, device or record.keys.device)
    lost = [[0.0] * g.num_scales for _ in range(g.num_layers)]

    def on_attend(layer: int, s: int, kept) -> None:
        if kept is None or s == 0:
            return
        hist = ref.history_mass[layer][s]
        held = torch.zeros(hist.shape, dtype=hist.dtype, device=hist.device)
        kept = kept.to(hist.device)
        # Per-head plans pad a head's ids with -1: they add nothing (ids are unique otherwise).
        held.scatter_add_(2, kept.clamp_min(0), (kept >= 0).to(held.dtype))
        lost[layer][s] = float((hist * (1.0 - held)).sum(-1).mean())  # exactly 0 when all are held

    outputs = replay(record, policy, policy_spec, backend=backend, device=device, on_attend=on_attend)
    errors = []
    for layer in range(g.num_layers):
        row = []
        for s in range(g.num_scales):
            full = ref.outputs[layer][s]
            norm = float(full.norm())
            row.append(float((outputs[layer][s] - full).norm()) / norm if norm > 0 else 0.0)
        errors.append(tuple(row))
    errors_t, lost_t = tuple(errors), tuple(tuple(r) for r in lost)
    n = g.scale_lengths
    per_layer = tuple(aggregate((e,), (m,), n) for e, m in zip(errors_t, lost_t))
    per_scale = tuple(sum(row[s] for row in errors_t) / g.num_layers for s in range(g.num_scales))
    lost_mass = aggregate(errors_t, lost_t, n, "mean_lost_mass") if g.num_scales > 1 else 0.0
    return ProxyScore(aggregate(errors_t, lost_t, n), per_layer, per_scale, lost_mass, errors_t, lost_t)

