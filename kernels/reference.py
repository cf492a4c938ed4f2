"""PyTorch reference implementations of the two kernel ops (the ``torch`` backend).

These are the ground truth the Triton kernels are tested against and the path the engine takes on
CPU. ``kv_attention_reference`` with equal cache lengths is, on purpose, exactly the computation
of the official VAR code (SDPA over the concatenated keys, no mask), so that the full-cache engine
reproduces official images bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from varkv_kernels.packed import PackedKV, unpack_prefix
from varkv_kernels.quant import QuantizedKV, dequantize


def uniform_length(lens: torch.Tensor) -> int | None:
    """The common value of ``lens`` when all entries are equal, else ``None`` (one host sync)."""
    if lens.numel() == 0:
        return 0
    flat = lens.reshape(-1)
    first = flat[0]
    if bool((flat == first).all()):
        return int(first)
    return None


def kv_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_lens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                           softmax_scale: float, *, uniform_len: int | None = None) -> torch.Tensor:
    """Attention of a scale's queries over its valid cache prefix plus its own tokens.

    Parameters
    ----------
    q, k_new, v_new: ``[R, H, Lq, D]``; the scale attends to all its own tokens (no causal mask).
    k_cache, v_cache: ``[R, H, C, D]`` tensors in ``q``'s dtype, or :class:`~varkv_kernels.quant.QuantizedKV`
        buffers (dequantized to ``q``'s dtype first); the first ``cache_lens[r, h]`` tokens are valid.
        Or :class:`~varkv_kernels.packed.PackedKV` (per-head capacities ``C_h``): the used prefix of every
        head is unpacked into a padded ``[R, H, max, D]`` copy first, then attended like that.
    cache_lens: ``[R, H]`` int32 (values above ``C``, or ``C_h`` when packed, count as that).
    softmax_scale: multiplies ``q·kᵀ`` before the softmax.
    uniform_len: the caller's promise that every ``cache_lens`` entry equals this value (skips the
        check; a wrong promise gives wrong results).

    Returns
    -------
    ``[R, H, Lq, D]`` in ``q``'s dtype. With equal lengths ``n`` this is exactly
    ``F.scaled_dot_product_attention(q, cat(k_cache[:, :, :n], k_new), cat(v_cache[:, :, :n], v_new),
    scale=softmax_scale)``.
    """
    if isinstance(k_cache, PackedKV):
        k_cache, v_cache, cache_lens = _unpacked(k_cache, v_cache, cache_lens, q.dtype)
        uniform_len = None  # the lengths were clamped per head: look at them again
    n = uniform_length(cache_lens) if uniform_len is None else int(uniform_len)
    if isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV):
        # Dequantize only the prefix any (row, head) reads: a transient copy (the Triton kernel
        # dequantizes in registers instead).
        used = n if n is not None else int(cache_lens.max()) if cache_lens.numel() else 0
        used = min(used, k_cache.shape[2])
        k_cache, v_cache = (_dequantized_prefix(t, used, q.dtype) for t in (k_cache, v_cache))
    if n is not None:
        k = torch.cat((k_cache[:, :, :n], k_new), dim=2)
        v = torch.cat((v_cache[:, :, :n], v_new), dim=2)
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
    # Ragged lengths: pad every (row, head) to the longest prefix and mask the rest out. The new
    # tokens are always visible, so no query row is ever fully masked (no NaN).
    lens = cache_lens.to(device=q.device, dtype=torch.int64).clamp(0, k_cache.shape[2])
    n_max = int(lens.max())
    k = torch.cat((k_cache[:, :, :n_max], k_new), dim=2)
    v = torch.cat((v_cache[:, :, :n_max], v_new), dim=2)
    pos = torch.arange(n_max + k_new.shape[2], device=q.device)
    visible = (pos.view(1, 1, -1) < lens.unsqueeze(-1)) | (pos >= n_max).view(1, 1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible.unsqueeze(2), scale=softmax_scale)


def _unpacked(k_cache: PackedKV, v_cache: PackedKV, cache_lens: torch.Tensor, dtype: torch.dtype):
    """Padded ``[R, H, n, D]`` copies of what any row of each head reads, and the lengths clamped to
    each head's capacity (so every head reads only its own segment)."""
    caps = torch.tensor(k_cache.capacities, dtype=torch.int64, device=cache_lens.device)
    lens = torch.minimum(cache_lens.to(torch.int64).clamp_min(0), caps.view(1, -1))
    used = lens.amax(dim=0).tolist() if lens.numel() else [0] * k_cache.heads  # one host sync
    return unpack_prefix(k_cache, used, dtype), unpack_prefix(v_cache, used, dtype), lens.to(torch.int32)


def _dequantized_prefix(t, length: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(t, QuantizedKV):
        return dequantize(t.narrow(0, length), dtype)
    return t[:, :, :length]


def token_scores_reference(q_obs: torch.Tensor, keys: torch.Tensor, key_lens: torch.Tensor,
                           softmax_scale: float, *, pool_kernel: int = 0) -> torch.Tensor:
    """Attention mass an observation window of queries puts on each candidate key.

    Parameters
    ----------
    q_obs: ``[R, H, W, D]`` window queries.
    keys: ``[R, H, N, D]`` candidate keys; the first ``key_lens[r, h]`` are valid.
    key_lens: ``[R, H]`` int32.
    softmax_scale: multiplies ``q·kᵀ`` before the softmax.
    pool_kernel: odd width of a stride-1, same-padded 1-D max-pool along N over the valid keys
        (0 or 1: no pooling).

    Returns
    -------
    ``[R, H, N]`` fp32: ``sum_w softmax_n(q_w·k_n·scale)`` over the valid keys (each query's softmax
    normalized over the valid keys only); invalid positions hold ``-inf``.
    """
    n = keys.shape[2]
    logits = torch.matmul(q_obs.float(), keys.float().transpose(-1, -2)) * softmax_scale  # [R, H, W, N]
    valid = torch.arange(n, device=keys.device).view(1, 1, -1) < key_lens.to(keys.device).long().unsqueeze(-1)
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    # A (row, head) without valid keys has an all -inf row: softmax gives NaN there, masked below.
    mass = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)
    mass = mass.masked_fill(~valid, float("-inf"))
    if pool_kernel > 1 and n > 0:
        # -inf at invalid positions and in the implicit padding: pooling sees valid keys only.
        r, h = mass.shape[:2]
        pooled = F.max_pool1d(mass.reshape(r * h, 1, n), pool_kernel, stride=1, padding=pool_kernel // 2)
        mass = pooled.reshape(r, h, n).masked_fill(~valid, float("-inf"))
    return mass
