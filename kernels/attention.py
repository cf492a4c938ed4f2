"""Triton attention of a scale's queries over a ragged KV cache plus the scale's own tokens.

One program handles ``BLOCK_M`` query rows of one (row, head): stage 1 streams the valid cache
prefix (its length read from ``cache_lens`` at run time), stage 2 streams the scale's own new
tokens; an online softmax in exp2 form keeps one fp32 accumulator, so no attention matrix is ever
materialized and the cache and new tokens never have to be concatenated.

Cache formats (:mod:`varkv_kernels.quant`): a plain tensor cache in ``q``'s dtype runs the kernel below;
an int8 / int4 :class:`~varkv_kernels.quant.QuantizedKV` cache runs :mod:`varkv_kernels.attention_quant`'s
kernel, which loads the codes plus their fp16 scales (and zero points) and dequantizes stage-1 tiles in
registers (its constexpr ``KV_FMT`` picks the format); stage 2 stays in ``q``'s dtype in both. A
zero-capacity cache of either kind takes the plain kernel (nothing of the cache is read). A
:class:`~varkv_kernels.packed.PackedKV` cache (per-head capacities, heads back to back on one token axis)
runs the same kernels with the constexpr ``PACKED``: a program's cache pointer starts at its head's
offset instead of ``h × head stride`` and its length is clamped to the head's capacity; the
unpacked path compiles as before.

Importing this module defines the kernel: ``TRITON_INTERPRET=1`` must be set before that for the
CPU interpreter (see :mod:`varkv_kernels.dispatch`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from varkv_kernels._launch import int32_lens, launch_flags, packed_row_head_span, row_head_span
from varkv_kernels.attention_quant import half_block, launch_quantized
from varkv_kernels.packed import PackedKV
from varkv_kernels.quant import QuantizedKV

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_span(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, span,
                 qk_scale, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr):
    """Fold ``span`` keys/values starting at ``k_base``/``v_base`` into the running softmax."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D
    for start in range(0, span, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < span
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:  # the interpreter cannot multiply bf16 (it sees raw uint16 bit patterns)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        # Every block holds at least one valid column, so m_new is finite and alpha never NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _kv_attention_kernel(
        Q, KC, VC, LENS, OFFS, KN, VN, O,
        sq_r, sq_h, sq_m, sq_d,
        skc_r, skc_h, skc_n, skc_d,
        svc_r, svc_h, svc_n, svc_d,
        skn_r, skn_h, skn_n, skn_d,
        svn_r, svn_h, svn_n, svn_d,
        so_r, so_h, so_m, so_d,
        H, LQ, C, qk_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr, PACKED: tl.constexpr):  #
    pid_m = tl.program_id(1)
    if PACKED:  # per-head segments of one [R, 1, T, D] store: the head's offset replaces the head stride
        r, h, n_cache, c0 = packed_row_head_span(tl.program_id(0), H, LENS, OFFS)
        kc = KC + r * skc_r + c0 * skc_n
        vc = VC + r * svc_r + c0 * svc_n
    else:
        r, h, n_cache = row_head_span(tl.program_id(0), H, LENS, C)
        kc = KC + r * skc_r + h * skc_h
        vc = VC + r * svc_r + h * svc_h

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m[:, None] < LQ) & (offs_d[None, :] < D)
    q = tl.load(Q + r * sq_r + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # stage 1: the valid cache prefix of this (row, head)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, kc, vc,
                                 skc_n, skc_d, svc_n, svc_d, n_cache, qk_scale, offs_d,
                                 D, BLOCK_N, UPCAST, IEEE)
    # stage 2: the scale's own tokens (always all visible)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, KN + r * skn_r + h * skn_h, VN + r * svn_r + h * svn_h,
                                 skn_n, skn_d, svn_n, svn_d, LQ, qk_scale, offs_d,
                                 D, BLOCK_N, UPCAST, IEEE)
    # epilogue: l_i >= 1 for every real query row (its own token is visible); padded rows guard /0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + r * so_r + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=row_ok)


def is_interpreted() -> bool:
    """True when the kernels of this module run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(_kv_attention_kernel).__name__ == "InterpretedFunction"


def block_config(lq: int, block_d: int, interpreted: bool, elt: int = 2) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``lq`` queries of padded head dim ``block_d``.

    Interpreter: big blocks (its cost is per program and loop step, not per element). GPU: a small
    hand-picked table (not tuned on hardware yet): VAR scales have 1 to 256 queries (680 tokens in
    all at 256px), so small scales use 16-row tiles (tl.dot's minimum) and stream K/V, larger ones
    64/128-row tiles; 128-wide heads halve BLOCK_N to stay within shared memory. fp32 (``elt`` 4)
    keeps at most 64 rows and 2 stages (40-75 KB of shared memory on sm_80/90 instead of 130-150 KB).
    """
    if interpreted:
        return min(64, max(16, triton.next_power_of_2(lq))), 64, 1, 1
    block_n = 64 if block_d <= 64 else 32
    if elt >= 4:
        return (16 if lq <= 16 else 64), block_n, 4, 2
    if lq <= 16:
        return 16, block_n, 4, 3
    if lq <= 64:
        return 32, block_n, 4, 3
    if lq <= 1024:
        return 64, block_n, 4, 3
    return 128, block_n, 8, 3


def kv_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cache_lens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        softmax_scale: float) -> torch.Tensor:
    """Triton implementation of :func:`varkv_kernels.dispatch.kv_attention` (same shapes, arguments
    already checked).

    ``k_cache``/``v_cache``: tensors in ``q``'s dtype, or :class:`~varkv_kernels.quant.QuantizedKV` of one
    format (dequantized in registers by :mod:`varkv_kernels.attention_quant`), or
    :class:`~varkv_kernels.packed.PackedKV` of either kind (per-head segments: both kernels take the head
    offsets, ``PACKED``).
    """
    r, h, lq, d = q.shape
    flags = launch_flags(q, is_interpreted())
    out = torch.empty(r, h, lq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    lens = int32_lens(cache_lens, q.device)
    offsets = None
    if isinstance(k_cache, PackedKV):  # per-head segments: the kernels read the head offsets
        offsets = k_cache.offsets.to(device=q.device, dtype=torch.int32).contiguous()
        k_cache, v_cache = k_cache.store, v_cache.store
    qk_scale = float(softmax_scale) * _LOG2E
    quantized = isinstance(k_cache, QuantizedKV), isinstance(v_cache, QuantizedKV)
    if any(quantized) and (not all(quantized) or k_cache.fmt != v_cache.fmt):
        raise ValueError("the triton backend needs k_cache and v_cache in one format, got "
                         + " and ".join(t.fmt if isinstance(t, QuantizedKV) else str(t.dtype)
                                        for t in (k_cache, v_cache)))
    if all(quantized) and k_cache.shape[2] > 0:
        # Two halves of half_block(d) columns each: as wide as BLOCK_D, or wider for head_dim < 32.
        block_m, block_n, warps, stages = block_config(lq, 2 * half_block(d), flags.interpreted,
                                                       q.element_size())
        launch_quantized(q, k_cache, v_cache, lens, k_new, v_new, out, qk_scale, offsets=offsets,
                         block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                         upcast=flags.upcast, ieee=flags.ieee)
        return out
    block_m, block_n, warps, stages = block_config(lq, flags.block_d, flags.interpreted, q.element_size())
    kc, vc = k_cache, v_cache
    if k_cache.shape[2] == 0:
        # A zero-capacity buffer may be a null pointer with odd strides: point at the new tokens
        # instead and read nothing from them.
        kc, vc, lens, offsets = k_new, v_new, torch.zeros_like(lens), None
    grid = (r * h, triton.cdiv(lq, block_m))  # (row, head) pairs on axis 0: see kernels/_launch.py
    _kv_attention_kernel[grid](
        # OFFS is read only when PACKED; any valid pointer otherwise.
        q, kc, vc, lens, lens if offsets is None else offsets, k_new, v_new, out,
        *q.stride(), *kc.stride(), *vc.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        h, lq, kc.shape[2], qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, PACKED=offsets is not None,
        **flags.constexprs(),
    )
    return out
