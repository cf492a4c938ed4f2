"""The Triton attention kernel over an int8 / int4 cache (:class:`varkv_kernels.quant.QuantizedKV`).

Same algorithm as :mod:`varkv_kernels.attention` (one program per (row, head) and ``BLOCK_M`` queries, an
online softmax over stage 1, the valid cache prefix, then stage 2, the scale's own tokens), but stage 1
loads the stored codes plus their fp16 scale (and zero point) per token and dequantizes them in
registers, so it reads 1 (int8) or 0.5 (int4) bytes per cached element plus 2 or 4 bytes per vector
instead of 2. Dequantization is fp32 math, exactly :func:`varkv_kernels.quant.dequantize`'s, then the tile
is rounded to ``q``'s dtype and takes the same ``tl.dot`` path as an unquantized one. Stage 2 stays
in ``q``'s dtype.

The kernel works on the two *halves* of every head vector: dims ``[0, HALF)`` and ``[HALF, D)`` with
``HALF = ceil(D / 2)``. int4's half-split layout stores element ``j`` in the low nibble and element
``j + D/2`` in the high nibble of byte ``j``, so one ``[BLOCK_N, HALF]`` byte tile gives both halves;
int8 loads its halves as two tiles of the same shape. ``q``, the new tokens, the accumulator and the
output are split the same way, and every ``q·kᵀ`` / ``P·V`` is two dots of width ``BLOCK_H`` (each half
padded to a power of two >= 16 and masked: head_dim 80 is two halves of 40 in 64-wide tiles). No
``tl.join`` / reshape is needed, so the interpreter and compiled Triton run the same code. The
constexpr ``KV_FMT`` (1 int8, 2 int4) selects the tile loader; the unquantized cache keeps its own
kernel in :mod:`varkv_kernels.attention`, untouched.

Importing this module defines the kernel: ``TRITON_INTERPRET=1`` must be set before that for the CPU
interpreter (see :mod:`varkv_kernels.dispatch`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from varkv_kernels._launch import packed_row_head_span, row_head_span
from varkv_kernels.quant import QuantizedKV

FMT_CODE = {"int8": 1, "int4": 2}  # the kernel's KV_FMT per format


@triton.jit
def _cache_halves(DATA, SCALE, ZERO, cols, col_ok, offs_j, sd_n, sd_d, ss_n, sz_n,
                  D: tl.constexpr, HALF: tl.constexpr, KV_FMT: tl.constexpr):
    """fp32 ``(lo, hi)`` ``[BLOCK_N, BLOCK_H]`` tiles of dims ``j`` and ``HALF + j`` of tokens ``cols``."""
    s = tl.load(SCALE + cols * ss_n, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    lo_ok = col_ok[:, None] & (offs_j[None, :] < HALF)
    rows = DATA + cols[:, None] * sd_n
    if KV_FMT == 1:  # int8: x = code * scale
        hi_ok = col_ok[:, None] & (offs_j[None, :] < D - HALF)
        lo = tl.load(rows + offs_j[None, :] * sd_d, mask=lo_ok, other=0).to(tl.float32) * s
        hi = tl.load(rows + (HALF + offs_j)[None, :] * sd_d, mask=hi_ok, other=0).to(tl.float32) * s
    else:  # int4, half-split bytes: x = code * scale + zero (D is even, so both halves are HALF wide)
        z = tl.load(ZERO + cols * sz_n, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        b = tl.load(rows + offs_j[None, :] * sd_d, mask=lo_ok, other=0).to(tl.int32)
        # Padded columns and dims must be 0, not the zero point (they would enter P·V's padding).
        lo = tl.where(lo_ok, (b & 15).to(tl.float32) * s + z, 0.0)
        hi = tl.where(lo_ok, (b >> 4).to(tl.float32) * s + z, 0.0)
    return lo, hi


@triton.jit
def _plain_halves(base, cols, col_ok, offs_j, s_n, s_d, D: tl.constexpr, HALF: tl.constexpr):
    """``(lo, hi)`` tiles of an unquantized ``[N, D]`` span (its dtype), padding 0."""
    rows = base + cols[:, None] * s_n
    lo = tl.load(rows + offs_j[None, :] * s_d, mask=col_ok[:, None] & (offs_j[None, :] < HALF), other=0.0)
    hi = tl.load(rows + (HALF + offs_j)[None, :] * s_d, mask=col_ok[:, None] & (offs_j[None, :] < D - HALF),
                 other=0.0)
    return lo, hi


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``a·b + acc`` (fp32 accumulator); one return at the end (see kernels/scoring.py)."""
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _logits(q_lo, q_hi, k_lo, k_hi, IEEE: tl.constexpr):
    """``q·kᵀ`` as the sum of the two halves' dots (fp32)."""
    if IEEE:
        qk = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
    else:
        qk = tl.dot(q_lo, tl.trans(k_lo))
    return _dot(q_hi, tl.trans(k_hi), qk, IEEE)


@triton.jit
def _softmax_step(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, col_ok, qk_scale,
                  IEEE: tl.constexpr):
    """Fold one block of keys/values (halves, already in the dot dtype) into the running softmax."""
    qk = _logits(q_lo, q_hi, k_lo, k_hi, IEEE)
    qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
    # Every block holds at least one valid column, so m_new is finite and alpha never NaN.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v_lo.dtype)
    acc_lo = _dot(p, v_lo, acc_lo * alpha[:, None], IEEE)
    acc_hi = _dot(p, v_hi, acc_hi * alpha[:, None], IEEE)
    return acc_lo, acc_hi, m_new, l_i


@triton.jit
def _kv_attention_quant_kernel(
        Q, KD, KS, KZ, VD, VS, VZ, LENS, OFFS, KN, VN, O,
        sq_r, sq_h, sq_m, sq_d,
        skd_r, skd_h, skd_n, skd_d, sks_r, sks_h, sks_n, skz_r, skz_h, skz_n,
        svd_r, svd_h, svd_n, svd_d, svs_r, svs_h, svs_n, svz_r, svz_h, svz_n,
        skn_r, skn_h, skn_n, skn_d,
        svn_r, svn_h, svn_n, svn_d,
        so_r, so_h, so_m, so_d,
        H, LQ, C, qk_scale,
        D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, KV_FMT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        PACKED: tl.constexpr):  #
    pid_m = tl.program_id(1)
    if PACKED:  # per-head segments of one [R, 1, T] store: the head's offset replaces the head stride
        r, h, n_cache, c0 = packed_row_head_span(tl.program_id(0), H, LENS, OFFS)
        kd, ks, kz = KD + r * skd_r + c0 * skd_n, KS + r * sks_r + c0 * sks_n, KZ + r * skz_r + c0 * skz_n
        vd, vs, vz = VD + r * svd_r + c0 * svd_n, VS + r * svs_r + c0 * svs_n, VZ + r * svz_r + c0 * svz_n
    else:
        r, h, n_cache = row_head_span(tl.program_id(0), H, LENS, C)
        kd, ks, kz = KD + r * skd_r + h * skd_h, KS + r * sks_r + h * sks_h, KZ + r * skz_r + h * skz_h
        vd, vs, vz = VD + r * svd_r + h * svd_h, VS + r * svs_r + h * svs_h, VZ + r * svz_r + h * svz_h

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    q_lo, q_hi = _plain_halves(Q + r * sq_r + h * sq_h, offs_m, offs_m < LQ, offs_j, sq_m, sq_d, D, HALF)
    if UPCAST:  # the interpreter cannot multiply bf16 (it sees raw uint16 bit patterns)
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    # stage 1: the valid cache prefix of this (row, head), dequantized in registers
    for start in range(0, n_cache, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_cache
        k_lo, k_hi = _cache_halves(kd, ks, kz, cols, col_ok, offs_j, skd_n, skd_d, sks_n, skz_n,
                                   D, HALF, KV_FMT)
        v_lo, v_hi = _cache_halves(vd, vs, vz, cols, col_ok, offs_j, svd_n, svd_d, svs_n, svz_n,
                                   D, HALF, KV_FMT)
        dt = q_lo.dtype  # q's dtype (fp32 when upcast): what the reference dequantizes to
        acc_lo, acc_hi, m_i, l_i = _softmax_step(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi,
                                                 k_lo.to(dt), k_hi.to(dt), v_lo.to(dt), v_hi.to(dt),
                                                 col_ok, qk_scale, IEEE)
    # stage 2: the scale's own tokens (always all visible), in q's dtype
    kn, vn = KN + r * skn_r + h * skn_h, VN + r * svn_r + h * svn_h
    for start in range(0, LQ, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < LQ
        k_lo, k_hi = _plain_halves(kn, cols, col_ok, offs_j, skn_n, skn_d, D, HALF)
        v_lo, v_hi = _plain_halves(vn, cols, col_ok, offs_j, svn_n, svn_d, D, HALF)
        if UPCAST:
            k_lo, k_hi = k_lo.to(tl.float32), k_hi.to(tl.float32)
            v_lo, v_hi = v_lo.to(tl.float32), v_hi.to(tl.float32)
        acc_lo, acc_hi, m_i, l_i = _softmax_step(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_lo, k_hi, v_lo, v_hi,
                                                 col_ok, qk_scale, IEEE)
    # epilogue: l_i >= 1 for every real query row (its own token is visible); padded rows guard /0.
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    rows = O + r * so_r + h * so_h + offs_m[:, None] * so_m
    row_ok = offs_m[:, None] < LQ
    tl.store(rows + offs_j[None, :] * so_d, (acc_lo * inv[:, None]).to(O.dtype.element_ty),
             mask=row_ok & (offs_j[None, :] < HALF))
    tl.store(rows + (HALF + offs_j)[None, :] * so_d, (acc_hi * inv[:, None]).to(O.dtype.element_ty),
             mask=row_ok & (offs_j[None, :] < D - HALF))


def half_block(head_dim: int) -> int:
    """``BLOCK_H``: one half of a head vector padded to a power of two (>= 16, ``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2((head_dim + 1) // 2))


def launch_quantized(q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV, lens: torch.Tensor,
                     k_new: torch.Tensor, v_new: torch.Tensor, out: torch.Tensor, qk_scale: float, *,
                     offsets: torch.Tensor | None = None, block_m: int, block_n: int, num_warps: int,
                     num_stages: int, upcast: bool, ieee: bool) -> None:
    """Run the kernel into ``out``; ``lens`` int32 contiguous ``[R, H]``, ``qk_scale`` in log2 units.

    ``offsets``: ``[H + 1]`` int32 head offsets when the caches are the stores of a
    :class:`~varkv_kernels.packed.PackedKV` (``[R, 1, Σ_h C_h, ...]``), else None.

    The caller (:func:`varkv_kernels.attention.kv_attention_triton`) has checked the arguments, handled
    empty outputs and zero capacity (no cache pointer to read), and picked the block sizes.
    """
    if k_cache.fmt != v_cache.fmt or k_cache.fmt not in FMT_CODE:
        raise ValueError(f"k/v caches must share one quantized format, got {k_cache.fmt!r} and "
                         f"{v_cache.fmt!r}")
    r, h, lq, d = q.shape
    if k_cache.fmt == "int4" and d % 2:
        raise ValueError(f"int4 storage needs an even head_dim, got {d}")

    def parts(t: QuantizedKV):
        zero = t.zero if t.zero is not None else t.scale  # int8: never read, any valid pointer
        return (t.data, t.scale, zero), (*t.data.stride(), *t.scale.stride(), *zero.stride())

    (kd, ks, kz), k_strides = parts(k_cache)
    (vd, vs, vz), v_strides = parts(v_cache)
    grid = (r * h, triton.cdiv(lq, block_m))  # (row, head) pairs on axis 0: see kernels/_launch.py
    _kv_attention_quant_kernel[grid](
        q, kd, ks, kz, vd, vs, vz, lens, lens if offsets is None else offsets, k_new, v_new, out,
        *q.stride(), *k_strides, *v_strides, *k_new.stride(), *v_new.stride(), *out.stride(),
        h, lq, k_cache.shape[2], qk_scale,
        D=d, HALF=(d + 1) // 2, BLOCK_H=half_block(d), BLOCK_M=block_m, BLOCK_N=block_n,
        KV_FMT=FMT_CODE[k_cache.fmt], UPCAST=upcast, IEEE=ieee, PACKED=offsets is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
