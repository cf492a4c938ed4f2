"""Triton token scoring: attention mass of an observation window on each candidate key.

ScaleKV-style selection ranks the candidates of a (row, head) by how much softmax mass a small
window of queries puts on them. The mass needs each query's softmax normalizer over *all* valid
keys, so it takes two passes without a ``[W, N]`` matrix in memory:

1. per query, the log2-sum-exp over the valid keys (online max/sum), ``W`` floats per (row, head);
2. per block of keys, ``sum_w exp2(q_w·k·scale·log2e - lse_w)`` streamed over the window;

and an optional third launch max-pools the ``[N]`` result (it needs its neighbours' final sums).

Importing this module defines the kernels: ``TRITON_INTERPRET=1`` must be set before that for the
CPU interpreter (see :mod:`varkv_kernels.dispatch`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from varkv_kernels._launch import int32_lens, launch_flags, row_head_span
from varkv_kernels.attention import is_interpreted

_LOG2E = 1.4426950408889634


@triton.jit
def _logits(q, k, IEEE: tl.constexpr):
    # One return at the end: early returns inside branches are fragile in the GPU code generator.
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    return qk


@triton.jit
def _window_lse_kernel(
        Q, K, LENS, LSE,
        sq_r, sq_h, sq_w, sq_d, sk_r, sk_h, sk_n, sk_d,
        H, W, N, qk_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr):  #
    """Pass 1: ``LSE[rh, w] = log2 sum_n exp2(q_w·k_n·qk_scale)`` over the valid keys."""
    pid_w = tl.program_id(1)
    pid_rh = tl.program_id(0)
    r, h, n_valid = row_head_span(pid_rh, H, LENS, N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D
    q = tl.load(Q + r * sq_r + h * sq_h + offs_w[:, None] * sq_w + offs_d[None, :] * sq_d,
                mask=(offs_w[:, None] < W) & d_ok, other=0.0)
    if UPCAST:  # the interpreter cannot multiply bf16
        q = q.to(tl.float32)
    k_base = K + r * sk_r + h * sk_h
    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    for start in range(0, n_valid, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_valid
        k = tl.load(k_base + cols[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.where(col_ok[None, :], _logits(q, k, IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    # No valid key: m = -inf, l = 0 -> lse = -inf (pass 2 then writes -inf everywhere anyway).
    lse = m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))
    tl.store(LSE + pid_rh * W + offs_w, lse, mask=offs_w < W)


@triton.jit
def _window_mass_kernel(
        Q, K, LENS, LSE, S,
        sq_r, sq_h, sq_w, sq_d, sk_r, sk_h, sk_n, sk_d,
        H, W, N, qk_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr):  #
    """Pass 2: ``S[rh, n] = sum_w exp2(q_w·k_n·qk_scale - LSE[rh, w])``; ``-inf`` past the valid keys."""
    pid_n = tl.program_id(1)
    pid_rh = tl.program_id(0)
    r, h, n_valid = row_head_span(pid_rh, H, LENS, N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_valid
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    d_ok = offs_d[None, :] < D
    k = tl.load(K + r * sk_r + h * sk_h + cols[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=col_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    q_base = Q + r * sq_r + h * sq_h
    acc = tl.zeros([BLOCK_N], tl.float32)
    # Blocks entirely past the valid keys skip the window loop.
    w_end = tl.where(pid_n * BLOCK_N < n_valid, W, 0)
    for w0 in range(0, w_end, BLOCK_W):
        rows = w0 + offs_w
        row_ok = rows < W
        q = tl.load(q_base + rows[:, None] * sq_w + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + pid_rh * W + rows, mask=row_ok, other=0.0)
        p = tl.math.exp2(_logits(q, k, IEEE) * qk_scale - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        acc += tl.sum(p, 0)
    acc = tl.where(col_ok, acc, float("-inf"))
    tl.store(S + pid_rh * N + cols, acc, mask=cols < N)


@triton.jit
def _valid_max_pool_kernel(S, OUT, LENS, N, POOL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stride-1, same-padded max-pool of width ``POOL`` over the valid prefix of each ``S`` row."""
    pid_n = tl.program_id(1)
    pid_rh = tl.program_id(0)
    n_valid = tl.minimum(tl.load(LENS + pid_rh), N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for j in tl.static_range(POOL):
        src = cols + (j - POOL // 2)
        ok = (src >= 0) & (src < n_valid)
        best = tl.maximum(best, tl.load(S + pid_rh * N + src, mask=ok, other=float("-inf")))
    best = tl.where(cols < n_valid, best, float("-inf"))
    tl.store(OUT + pid_rh * N + cols, best, mask=cols < N)


def _blocks(w: int, block_d: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_W, BLOCK_N, num_warps)``: windows are small (16 queries in ScaleKV), keys are many."""
    block_w = min(64, max(16, triton.next_power_of_2(w)))
    if interpreted:
        return block_w, 128, 1
    return block_w, (64 if block_d > 64 else 128), 4


def token_scores_triton(q_obs: torch.Tensor, keys: torch.Tensor, key_lens: torch.Tensor, softmax_scale: float,
                        *, pool_kernel: int = 0) -> torch.Tensor:
    """Triton implementation of :func:`varkv_kernels.dispatch.token_scores` (same shapes, arguments
    already checked)."""
    r, h, w, d = q_obs.shape
    n = keys.shape[2]
    flags = launch_flags(q_obs, is_interpreted())
    scores = torch.empty(r, h, n, dtype=torch.float32, device=keys.device)
    if scores.numel() == 0:
        return scores
    if w == 0:  # an empty window puts no mass anywhere
        valid = torch.arange(n, device=keys.device) < key_lens.to(keys.device).long().unsqueeze(-1)
        return torch.zeros_like(scores).masked_fill_(~valid, float("-inf"))
    block_w, block_n, warps = _blocks(w, flags.block_d, flags.interpreted)
    lens = int32_lens(key_lens, keys.device)
    lse = torch.empty(r * h, w, dtype=torch.float32, device=keys.device)
    strides = (*q_obs.stride(), *keys.stride())
    consts = dict(BLOCK_W=block_w, BLOCK_N=block_n, num_warps=warps, **flags.constexprs())
    qk_scale = float(softmax_scale) * _LOG2E
    _window_lse_kernel[(r * h, triton.cdiv(w, block_w))](q_obs, keys, lens, lse, *strides, h, w, n, qk_scale,
                                                         **consts)
    _window_mass_kernel[(r * h, triton.cdiv(n, block_n))](q_obs, keys, lens, lse, scores, *strides, h, w, n,
                                                          qk_scale, **consts)
    if pool_kernel > 1:
        pooled = torch.empty_like(scores)
        _valid_max_pool_kernel[(r * h, triton.cdiv(n, block_n))](scores, pooled, lens, n, POOL=pool_kernel,
                                                                 BLOCK_N=block_n, num_warps=warps)
        scores = pooled
    return scores
