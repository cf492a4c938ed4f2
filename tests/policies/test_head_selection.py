"""The shared selection rules under per-head budgets (a ragged :class:`SelectionState`): head ``h``'s
answer is exactly what the rule answers for a state holding that head alone, with its own kept
tokens and budget, and the tail of its row is zero. (Max-pooled scores tie between neighbours, and
``topk`` breaks ties by the tensor's width: there the two answers must be equally good, the same
multiset of scores.)
"""
from __future__ import annotations

import pytest
import torch

from tests.policies.helpers import TINY
from tuner.policies.base import SelectionState
from tuner.policies.selection import select_by_rule

RULES = [("recent", {}), ("sink_recent", {"sink_tokens": 5}),
         ("scores", {"window_size": 4, "pool_kernel": 3}), ("scores", {"window_size": 16, "pool_kernel": 0})]


def ragged_state(old_lens, keep, scale=4, rows=2, seed=0):
    """A ragged state on tiny's geometry: head ``h`` kept ``old_lens[h]`` random earlier tokens."""
    g, gen = TINY, torch.Generator().manual_seed(seed)
    h, d, n_new = len(old_lens), g.head_dim, g.scale_lengths[scale]
    start, o_max = g.scale_starts[scale], max(old_lens)
    positions = torch.full((rows, h, o_max + n_new), -1, dtype=torch.int64)
    k_old, v_old = torch.zeros(rows, h, o_max, d), torch.zeros(rows, h, o_max, d)
    for head, o in enumerate(old_lens):
        for r in range(rows):
            positions[r, head, :o] = torch.randperm(start, generator=gen)[:o].sort().values
        positions[:, head, o:o + n_new] = torch.arange(start, start + n_new)
        k_old[:, head, :o] = torch.randn(rows, o, d, generator=gen)
        v_old[:, head, :o] = torch.randn(rows, o, d, generator=gen)
    q = torch.nn.functional.normalize(torch.randn(rows, h, n_new, d, generator=gen), dim=-1) * 4
    k_new = torch.randn(rows, h, n_new, d, generator=gen)
    v_new = torch.randn(rows, h, n_new, d, generator=gen)
    return SelectionState(layer=0, scale=scale, budget=max(keep), geometry=g, positions=positions, queries=q,
                          k_old=k_old, v_old=v_old, k_new=k_new, v_new=v_new, head_budgets=tuple(keep),
                          old_lens=tuple(old_lens))


def one_head(state: SelectionState, head: int) -> SelectionState:
    """The uniform state of ``head`` alone: its own kept tokens and budget."""
    o = state.old_lens[head]
    sl = slice(head, head + 1)
    return SelectionState(layer=0, scale=state.scale, budget=state.head_budgets[head],
                          geometry=state.geometry, positions=state.positions[:, sl, :o + state.n_new],
                          queries=state.queries[:, sl], k_old=state.k_old[:, sl, :o],
                          v_old=state.v_old[:, sl, :o], k_new=state.k_new[:, sl], v_new=state.v_new[:, sl])


def pooled_scores(state: SelectionState, kw: dict) -> torch.Tensor:
    """``[R, 1, n]`` the score rule's ranking values of a one-head uniform state (before the lift)."""
    from varkv_kernels.dispatch import token_scores
    from tuner.policies.selection import observation_window

    side = state.geometry.patch_nums[state.scale]
    win = torch.tensor(observation_window(side, state.n_new, kw["window_size"]))
    lens = torch.full(state.queries.shape[:2], state.n_candidates, dtype=torch.int32)
    return token_scores(state.queries[:, :, win], state.keys, lens, 1.0, pool_kernel=kw["pool_kernel"])


@pytest.mark.parametrize("rule,kw", RULES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(RULES)])
@pytest.mark.parametrize("old_lens,keep", [((10, 0, 30, 3), (8, 0, 40, 12)),  # a head keeping 0
                                           ((0, 0, 5, 5), (25, 1, 30, 2)),
                                           ((12, 12, 12, 12), (20, 20, 20, 20))])  # heads alike
def test_each_head_gets_the_uniform_rule_on_its_own_candidates(rule, kw, old_lens, keep):
    state = ragged_state(old_lens, keep)
    assert state.ragged and state.candidate_lens == tuple(o + 25 for o in old_lens)
    idx = select_by_rule(state, rule, **kw)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (2, 4, max(keep))
    for head, k in enumerate(keep):
        alone = select_by_rule(one_head(state, head), rule, **kw)
        alone = alone.expand(2, 1, k) if alone.dim() == 1 else alone
        if rule == "scores" and kw["pool_kernel"] > 1:
            score = pooled_scores(one_head(state, head), kw)[:, 0]
            assert torch.equal(score.gather(1, idx[:, head, :k]).sort().values,
                               score.gather(1, alone[:, 0]).sort().values), (rule, head)
        else:
            assert torch.equal(idx[:, head, :k], alone[:, 0]), (rule, head)
        assert not idx[:, head, k:].any()
    if len(set(old_lens)) == 1 and len(set(keep)) == 1:  # alike: the same tokens as the uniform state
        uniform = select_by_rule(SelectionState(
            layer=0, scale=state.scale, budget=keep[0], geometry=TINY, positions=state.positions,
            queries=state.queries, k_old=state.k_old, v_old=state.v_old, k_new=state.k_new,
            v_new=state.v_new), rule, **kw)
        assert torch.equal(idx, uniform.expand_as(idx))


def test_ragged_candidates_sit_right_after_each_heads_kept_tokens():
    state = ragged_state((3, 0), (2, 2))
    keys = state.keys
    assert torch.equal(keys[:, 0, :3], state.k_old[:, 0, :3])
    assert torch.equal(keys[:, 0, 3:28], state.k_new[:, 0])
    assert torch.equal(keys[:, 1, :25], state.k_new[:, 1])
    assert not keys[:, 1, 25:].any() and bool((state.positions[:, 1, 25:] == -1).all())
