"""Shared selection helpers: observation window, score-based top-k against a naive reference."""
from __future__ import annotations

import pytest
import torch

from tests.policies.helpers import TINY, check_indices
from tuner.policies.base import SelectionState
from tuner.policies.selection import observation_window, score_indices, share_budget, sink_recent_indices


def test_observation_window_grid_like_released_scalekv():
    grid = [1, 5, 9, 13]  # 16×16 map, cells of 4, centre offset 1
    assert observation_window(16, 256, 16) == sorted(r * 16 + c for r in grid for c in grid)
    assert observation_window(5, 25, 16) == sorted(r * 5 + c for r in range(4) for c in range(4))
    assert observation_window(3, 9, 16) == list(range(9))  # small map: all its tokens
    w = observation_window(16, 256, 10)  # 3×3 grid (cell 5, offset 2) padded with the last token
    assert w == sorted([r * 16 + c for r in (2, 7, 12) for c in (2, 7, 12)] + [255])


def test_observation_window_on_non_square_maps():
    """``(h, w)`` maps (Infinity's other aspect ratios): g bands of rows and of columns, each side apart."""
    assert observation_window((16, 16), 256, 16) == observation_window(16, 256, 16)  # square: unchanged
    rows, cols = [0, 2, 4, 6], [0, 1, 2, 3]  # 8x6 (4:3): row cells of 2, column cells of 1
    assert observation_window((8, 6), 48, 16) == sorted(r * 6 + c for r in rows for c in cols)
    rows, cols = [2, 7, 12], [1, 4, 7]  # 15x9 with a 3x3 grid: cells 5 and 3, centre offsets 2 and 1
    assert observation_window((15, 9), 135, 9) == sorted(r * 9 + c for r in rows for c in cols)
    # a side shorter than the grid (3x9, 1:3): one band per row, then the newest unused tokens pad
    # (24 and 22 are grid cells already)
    w = observation_window((3, 9), 27, 16)
    assert w == sorted([r * 9 + c for r in (0, 1, 2) for c in (0, 2, 4, 6)] + [26, 25, 23, 21])


def test_share_budget_water_fills():
    assert share_budget(10, [5, 5, 5]) == [3, 3, 4]
    assert share_budget(10, [1, 9, 9]) == [1, 4, 5]
    assert share_budget(100, [3, 4]) == [3, 4]
    assert share_budget(0, [3, 4]) == [0, 0]


def _state(budget, n_old=20, scale=4, rows=2, heads=3, d=8, seed=0):
    g = TINY
    gen = torch.Generator().manual_seed(seed)
    n_new = g.scale_lengths[scale]
    k = torch.nn.functional.normalize(torch.randn(rows, heads, n_old + n_new, d, generator=gen), dim=-1)
    q = torch.randn(rows, heads, n_new, d, generator=gen)
    pos = torch.cat((torch.arange(n_old), torch.arange(g.scale_starts[scale], g.scale_starts[scale] + n_new)))
    return SelectionState(layer=0, scale=scale, budget=budget, geometry=g,
                          positions=pos.expand(rows, heads, -1),
                          queries=q, k_old=k[:, :, :n_old], v_old=k[:, :, :n_old], k_new=k[:, :, n_old:],
                          v_new=k[:, :, n_old:], softmax_scale=0.7)


def naive_scores(state, window, pool):
    q = state.queries[:, :, window]
    attn = torch.softmax(q @ state.keys.transpose(-1, -2) * state.softmax_scale, dim=-1).sum(2)
    if pool:
        attn = torch.nn.functional.max_pool1d(attn.flatten(0, 1).unsqueeze(1), pool, 1,
                                              pool // 2).view_as(attn)
    return attn


@pytest.mark.parametrize("budget,pool", [(30, 5), (17, 0), (9, 3)])
def test_score_indices_match_naive_softmax_mass(budget, pool):
    state = _state(budget)
    idx = score_indices(state, window_size=16, pool_kernel=pool)
    check_indices(idx, budget, state.n_candidates, 2, 3)
    window = torch.tensor(observation_window(5, 25, 16))
    scores = naive_scores(state, window, pool)
    for r in range(2):
        for h in range(3):
            chosen = set(idx[r, h].tolist())
            win = set((window + state.n_old).tolist())
            if budget >= len(win):
                assert win <= chosen
                pool_set = set(range(state.n_candidates)) - win
            else:
                pool_set = win
            kept, dropped = chosen & pool_set, pool_set - chosen
            # top-k up to ties (max-pooling makes neighbours share a score)
            assert len(kept) == budget - (len(win) if budget >= len(win) else 0)
            if kept and dropped:
                assert (min(float(scores[r, h, i]) for i in kept)
                        >= max(float(scores[r, h, i]) for i in dropped) - 1e-6)
    assert not torch.equal(idx[0, 0], idx[1, 2])  # rows and heads choose independently


def test_sink_recent_per_head_when_histories_differ():
    state = _state(6, n_old=4)
    pos = state.positions.clone()
    pos[0, 1, :4] = torch.tensor([0, 1, 40, 41])  # this head kept only 2 sinks
    state.positions = pos
    idx = sink_recent_indices(state, sink_tokens=5)
    assert idx.shape == (2, 3, 6)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 27, 28]
    assert idx[0, 1].tolist() == [0, 1, 25, 26, 27, 28]


def test_score_indices_same_on_the_triton_backend():
    state = _state(12)
    want = score_indices(state, window_size=9, pool_kernel=0)
    state.backend = "triton"  # Triton interpreter without a GPU (tests/conftest.py)
    assert torch.equal(score_indices(state, window_size=9, pool_kernel=0), want)
