"""Explicit float64 loops the kernels and the reference are checked against (test helper)."""
from __future__ import annotations

import torch


def naive_kv_attention(q, k_cache, v_cache, cache_lens, k_new, v_new, scale) -> torch.Tensor:
    """Per (row, head): softmax over [cache[:len] ; new] written out in float64."""
    r, h, lq, d = q.shape
    out = torch.empty(r, h, lq, d, dtype=torch.float64)
    for i in range(r):
        for j in range(h):
            n = int(cache_lens[i, j])
            k = torch.cat((k_cache[i, j, :n], k_new[i, j])).double()
            v = torch.cat((v_cache[i, j, :n], v_new[i, j])).double()
            logits = q[i, j].double() @ k.T * scale
            weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            out[i, j] = (weights / weights.sum(dim=-1, keepdim=True)) @ v
    return out


def naive_token_scores(q_obs, keys, key_lens, scale, pool_kernel: int = 0) -> torch.Tensor:
    """Per (row, head): window softmax mass on each valid key, then max-pool over valid keys only."""
    r, h, _, _ = q_obs.shape
    n_all = keys.shape[2]
    out = torch.full((r, h, n_all), float("-inf"), dtype=torch.float64)
    for i in range(r):
        for j in range(h):
            n = int(key_lens[i, j])
            if n == 0:
                continue
            logits = q_obs[i, j].double() @ keys[i, j, :n].double().T * scale
            mass = torch.softmax(logits, dim=-1).sum(dim=0)
            if pool_kernel > 1:
                half = pool_kernel // 2
                mass = torch.stack([mass[max(0, c - half):c + half + 1].max() for c in range(n)])
            out[i, j, :n] = mass
    return out


def ragged_lens(rows: int, heads: int, capacity: int, seed: int) -> torch.Tensor:
    """int32 ``[rows, heads]`` lengths with 0 and ``capacity`` present and random values between."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, capacity + 1, (rows, heads), generator=gen, dtype=torch.int32)
    lens.view(-1)[0] = 0
    lens.view(-1)[-1] = capacity
    return lens
