"""Test helpers: synthetic calibration statistics and a miniature cache that drives ``select``."""
from __future__ import annotations

import torch

from tuner.calibration import Calibration, CalibrationSpec
from tuner.calibration_head_summary import HeadCalibration
from tuner.policies.base import CacheGeometry, KVPolicy, PolicySpec, SelectionState

TINY = CacheGeometry(6, 4, 32, (1, 2, 3, 4, 5, 6, 8))          # the built-in tiny model
SMALL = CacheGeometry(2, 2, 64, (1, 2, 3, 4))                   # tests/conftest.small_config()
D16 = CacheGeometry(16, 16, 64, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
D30 = CacheGeometry(30, 30, 64, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def synthetic_calibration(g: CacheGeometry, seed: int = 0, name: str = "synthetic") -> Calibration:
    """Random but valid statistics (density rows consistent: sum_i d[j][i] * T_i = T_j)."""
    gen = torch.Generator().manual_seed(seed)
    n, s = g.num_layers, g.num_scales
    sim = -torch.rand(n, s, generator=gen) - 0.2
    car = torch.rand(n, s, generator=gen) * 0.9 + 0.05
    htk = torch.rand(n, s, generator=gen) * 0.5

    def table(t):
        return tuple(tuple(None if j == 0 else float(t[i, j]) for j in range(s)) for i in range(n))

    density = []
    for _ in range(n):
        m = []
        for j in range(s):
            w = torch.rand(j + 1, generator=gen)
            w = w / w.sum() * g.scale_lengths[j]  # mass per key scale, summing to T_j
            m.append(tuple(float(w[i]) / g.scale_lengths[i] if i <= j else 0.0 for i in range(s)))
        density.append(tuple(m))
    return Calibration(name, tuple(g.patch_nums), n, table(sim), table(car), table(htk), tuple(density),
                       CalibrationSpec(samples=4, seed=seed), heads=synthetic_heads(g, gen),
                       scale_shapes=g.scale_shapes)


def synthetic_heads(g: CacheGeometry, gen: torch.Generator) -> HeadCalibration:
    """Random but valid per-head statistics: S-CAS and history mass in (0, 1), dispersion in (0.5, 1),
    every head different (so head-aware plans are not uniform by accident)."""
    n, h, s = g.num_layers, g.num_heads, g.num_scales
    scas = torch.rand(n, h, s, generator=gen) * 0.5 + 1e-3
    hist = torch.rand(n, h, s, generator=gen) * 0.9 + 0.05
    disp = torch.rand(n, h, generator=gen) * 0.5 + 0.5
    return HeadCalibration(
        scas=tuple(tuple(tuple(None if j == s - 1 else float(scas[a, b, j]) for j in range(s))
                         for b in range(h)) for a in range(n)),
        history_mass=tuple(tuple(tuple(0.0 if j == 0 else float(hist[a, b, j]) for j in range(s))
                                 for b in range(h)) for a in range(n)),
        dispersion=tuple(tuple(float(disp[a, b]) for b in range(h)) for a in range(n)))


def spec_for(g: CacheGeometry, calibrated: bool = True, seed: int = 0) -> PolicySpec:
    return PolicySpec(g, "synthetic", synthetic_calibration(g, seed) if calibrated else None)


def check_indices(idx: torch.Tensor, budget: int, n: int, rows: int, heads: int) -> None:
    assert idx.dtype == torch.int64
    assert idx.dim() in (1, 3)
    assert idx.shape[-1] == budget
    if idx.dim() == 3:
        assert tuple(idx.shape[:2]) == (rows, heads)
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    if budget > 1:
        assert bool((idx[..., 1:] > idx[..., :-1]).all()), "indices must be unique and sorted"


def simulate(policy: KVPolicy, spec: PolicySpec, rows: int = 2, seed: int = 0,
             check_determinism: bool = True):
    """Run ``select`` exactly where the engine would, on random unit keys; returns kept positions.

    Returns ``kept[layer][scale]`` = ``[rows, heads, budget]`` int64 global positions after that scale.
    """
    g = spec.geometry
    plan = policy.plan(spec)
    gen = torch.Generator().manual_seed(seed)
    h, d = g.num_heads, g.head_dim
    keys = torch.nn.functional.normalize(torch.randn(rows, h, g.seq_len, d, generator=gen), dim=-1)
    values = torch.randn(rows, h, g.seq_len, d, generator=gen)
    queries = torch.nn.functional.normalize(torch.randn(rows, h, g.seq_len, d, generator=gen), dim=-1) * 4.0
    kept = [[None] * g.num_scales for _ in range(g.num_layers)]
    for layer in range(g.num_layers):
        pos = torch.empty(rows, h, 0, dtype=torch.int64)
        for s in range(g.num_scales):
            start, n_new = g.scale_starts[s], g.scale_lengths[s]
            new = torch.arange(start, start + n_new).expand(rows, h, n_new)
            cand = torch.cat((pos, new), dim=2)
            budget = plan.budgets[layer][s]
            n = cand.shape[2]
            assert budget <= n
            if budget == n:
                pos = cand
            elif budget == 0:
                pos = cand[:, :, :0]
            else:
                gather = pos.unsqueeze(-1).expand(-1, -1, -1, d)
                state = SelectionState(layer=layer, scale=s, budget=budget, geometry=g, positions=cand,
                                       queries=queries[:, :, start:start + n_new],
                                       k_old=keys.gather(2, gather), v_old=values.gather(2, gather),
                                       k_new=keys[:, :, start:start + n_new],
                                       v_new=values[:, :, start:start + n_new])
                idx = policy.select(state)
                check_indices(idx, budget, n, rows, h)
                if check_determinism:
                    assert torch.equal(idx, policy.select(state)), "select must be deterministic"
                if idx.dim() == 1:
                    idx = idx.expand(rows, h, budget)
                pos = cand.gather(2, idx)
            kept[layer][s] = pos
    return kept
