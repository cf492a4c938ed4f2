"""Triton ``kv_attention`` over an int8 / int4 cache vs the PyTorch reference over the same cache.

Both sides read the same :class:`~varkv_kernels.quant.QuantizedKV` (quantization error is not what is tested
here: :mod:`varkv_kernels.quant`'s own tests bound it). The reference dequantizes with
:func:`varkv_kernels.quant.dequantize` and runs in fp32 (q, k_new, v_new upcast from the same rounded
values); the kernel dequantizes in registers with the same fp32 math, then rounds the tile to q's dtype
before its dots. Tolerances (|a-b| <= atol + rtol·|b|, outputs are O(1)) are those of
tests/kernels/test_attention_triton.py:

- fp32: atol 2e-5, rtol 1e-5 (the dequantized values are bit-identical; only the fp32 accumulation
  order differs; "ieee" dots, no tf32). Measured: <= 7.8e-7;
- fp16: atol 2e-3, rtol 2e-3 (fp16 output rounding, 2^-11, fp16 softmax weights into P·V, and the
  dequantized K/V rounded to fp16, another 2^-11 relative per element). Measured: <= 9.2e-4;
- bf16: atol 1.6e-2, rtol 1.6e-2 (the same with bf16's 2^-8; in the interpreter bf16 is upcast, so the
  K/V rounding only happens on a GPU). Measured in the interpreter: <= 7.6e-3.

A wrong nibble, scale or zero point moves outputs by O(0.1): far outside every tolerance.
"""
from __future__ import annotations

import pytest
import torch

from varkv_kernels.dispatch import kv_attention
from varkv_kernels.quant import QuantizedKV, quantize
from varkv_kernels.reference import kv_attention_reference
from tests.kernels.naive import ragged_lens

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
FORMATS = ("int8", "int4")


def _plain(r, h, lq, cap, d, dtype, device, seed):
    """q, k_cache, v_cache, k_new, v_new drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((r, h, lq, d), (r, h, cap, d), (r, h, cap, d), (r, h, lq, d), (r, h, lq, d))
    return [torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _make(r, h, lq, cap, d, dtype, device, fmt, seed=0):
    """q, quantized k/v caches of ``cap`` tokens, k_new, v_new."""
    q, kc, vc, kn, vn = _plain(r, h, lq, cap, d, dtype, device, seed)
    return q, quantize(kc, fmt), quantize(vc, fmt), kn, vn


def _check(q, kq, vq, lens, kn, vn, scale):
    out = kv_attention(q, kq, vq, lens, kn, vn, scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ref = kv_attention_reference(q.float(), kq, vq, lens, kn.float(), vn.float(), scale)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


def _contiguous(t: QuantizedKV) -> QuantizedKV:
    return QuantizedKV(t.fmt, t.data.contiguous(), t.scale.contiguous(),
                       None if t.zero is None else t.zero.contiguous(), t.head_dim)


CASES = [  # r, h, lq, capacity, head_dim, dtype
    (2, 3, 16, 40, 64, torch.float32),
    (2, 2, 9, 70, 128, torch.float16),
    (1, 2, 1, 33, 32, torch.float32),
    (2, 2, 4, 0, 32, torch.float16),  # capacity 0: nothing of the cache is read
    (2, 2, 16, 40, 64, torch.bfloat16),
    (2, 2, 100, 150, 64, torch.float16),  # several key blocks in both stages
    (1, 2, 5, 20, 80, torch.float32),  # head_dim not a power of two: halves of 40 padded to 64, masked
    (2, 2, 7, 45, 80, torch.bfloat16),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("r,h,lq,cap,d,dtype", CASES)
def test_ragged_lengths_match_reference(triton_device, fmt, r, h, lq, cap, d, dtype):
    q, kq, vq, kn, vn = _make(r, h, lq, cap, d, dtype, triton_device, fmt, seed=cap)
    lens = ragged_lens(r, h, cap, seed=lq).to(triton_device)  # holds 0 and cap
    _check(q, kq, vq, lens, kn, vn, d ** -0.5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lengths_beyond_capacity_are_clamped_like_the_reference(triton_device, fmt):
    q, kq, vq, kn, vn = _make(1, 2, 4, 8, 32, torch.float32, triton_device, fmt, seed=6)
    lens = torch.tensor([[3, 20]], dtype=torch.int32, device=triton_device)
    _check(q, kq, vq, lens, kn, vn, 0.3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_narrowed_views_and_strided_queries(triton_device, fmt):
    """Cache views from :meth:`QuantizedKV.narrow` of two buffers with different capacities (so k and v
    have different strides), q transposed from [R, Lq, H, D], new tokens as slices of one buffer."""
    r, h, lq, d = 2, 2, 16, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(r, lq, h, d, generator=gen).to(triton_device).transpose(1, 2)
    kq = quantize(torch.randn(r, h, 64, d, generator=gen).to(triton_device), fmt).narrow(8, 24)
    vq = quantize(torch.randn(r, h, 40, d, generator=gen).to(triton_device), fmt).narrow(3, 24)
    new = torch.randn(2, r, h, 32, d, generator=gen).to(triton_device)
    kn, vn = new[0, :, :, 4:4 + lq], new[1, :, :, 10:10 + lq]
    assert not kq.data.is_contiguous() and kq.data.stride() != vq.data.stride()
    lens = ragged_lens(r, h, 24, seed=3).to(triton_device)
    out = _check(q, kq, vq, lens, kn, vn, 0.125)
    dense = kv_attention(q.contiguous(), _contiguous(kq), _contiguous(vq), lens, kn.contiguous(),
                         vn.contiguous(), 0.125, backend="triton")
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equal_lengths_match_the_uniform_len_reference(triton_device, fmt, dtype):
    """All-equal lens: the kernel (ragged path) vs the reference's unmasked SDPA over the dequantized
    prefix (``uniform_len``, the full-cache engine's path), both in q's dtype."""
    q, kq, vq, kn, vn = _make(2, 3, 9, 30, 64, dtype, triton_device, fmt, seed=8)
    lens = torch.full((2, 3), 21, dtype=torch.int32, device=triton_device)
    out = _check(q, kq, vq, lens, kn, vn, 0.125)
    uniform = kv_attention_reference(q, kq, vq, lens, kn, vn, 0.125, uniform_len=21)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, uniform, atol=atol, rtol=rtol)


def test_int8_and_int4_differ_from_each_other_but_track_the_unquantized_cache(triton_device):
    """Guards against a loader that ignores its format: int4's coarser steps move the output more."""
    r, h, lq, cap, d = 2, 2, 8, 48, 64
    q, kc, vc, kn, vn = _plain(r, h, lq, cap, d, torch.float32, triton_device, seed=11)
    lens = torch.full((r, h), cap, dtype=torch.int32, device=triton_device)
    exact = kv_attention(q, kc, vc, lens, kn, vn, 0.125, backend="triton")
    err = {fmt: (kv_attention(q, quantize(kc, fmt), quantize(vc, fmt), lens, kn, vn, 0.125, backend="triton")
                 - exact).abs().max().item() for fmt in FORMATS}
    assert 0 < err["int8"] < 0.05 and err["int8"] < err["int4"] < 0.5, err  # measured 0.0074, 0.16


def test_mixed_cache_formats_are_refused(triton_device):
    q, kq, _, kn, vn = _make(1, 1, 2, 4, 32, torch.float32, triton_device, "int8")
    lens = torch.full((1, 1), 4, dtype=torch.int32, device=triton_device)
    v4 = quantize(torch.randn(1, 1, 4, 32).to(triton_device), "int4")
    with pytest.raises(ValueError, match="one format"):
        kv_attention(q, kq, v4, lens, kn, vn, 1.0, backend="triton")
    with pytest.raises(ValueError, match="one format"):
        kv_attention(q, kq, torch.zeros(1, 1, 4, 32, device=triton_device), lens, kn, vn, 1.0,
                     backend="triton")


GPU_CASES = [  # VAR-like shapes (d16 last scale, rows = 2·batch), head_dim 128 and 80
    (8, 16, 256, 424, 64), (2, 4, 33, 70, 128), (2, 4, 9, 40, 80),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,h,lq,cap,d", GPU_CASES)
def test_gpu_matches_reference(r, h, lq, cap, d, dtype, fmt):
    q, kq, vq, kn, vn = _make(r, h, lq, cap, d, dtype, "cuda", fmt, seed=lq)
    _check(q, kq, vq, ragged_lens(r, h, cap, seed=cap).cuda(), kn, vn, d ** -0.5)
    _check(q, kq.narrow(cap // 4, cap // 2), vq.narrow(0, cap // 2),
           torch.full((r, h), cap // 2, dtype=torch.int32, device="cuda"), kn, vn, d ** -0.5)
