"""Triton ``kv_attention`` vs the PyTorch reference (CPU interpreter here, the GPU when present).

Both sides see the same rounded inputs; the reference runs in fp32. Tolerances (|a-b| <= atol +
rtol·|b|, outputs are O(1)):

- fp32: atol 2e-5, rtol 1e-5 (fp32 accumulation in a different order; "ieee" dots, no tf32);
- fp16: atol 2e-3, rtol 2e-3 (fp16 output rounding, 2^-11, and fp16 softmax weights into P·V);
- bf16: atol 1.6e-2, rtol 1.6e-2 (the same with bf16's 2^-8; in the interpreter bf16 is upcast).
"""
from __future__ import annotations

import pytest
import torch

from varkv_kernels.dispatch import kv_attention
from varkv_kernels.reference import kv_attention_reference
from tests.kernels.naive import ragged_lens

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _make(r, h, lq, cap, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((r, h, lq, d), (r, h, cap, d), (r, h, cap, d), (r, h, lq, d), (r, h, lq, d))
    return [torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _check(q, kc, vc, lens, kn, vn, scale):
    out = kv_attention(q, kc, vc, lens, kn, vn, scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ref = kv_attention_reference(q.float(), kc.float(), vc.float(), lens, kn.float(), vn.float(), scale)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


CASES = [  # r, h, lq, capacity, head_dim, dtype
    (2, 3, 16, 40, 64, torch.float32),
    (2, 2, 9, 70, 128, torch.float16),
    (1, 2, 1, 33, 32, torch.float32),
    (2, 2, 4, 0, 16, torch.float16),
    (2, 2, 16, 40, 64, torch.bfloat16),
    (2, 2, 256, 300, 64, torch.float16),
    (1, 2, 5, 20, 80, torch.float32),  # head_dim not a power of two: padded to 128 and masked
]


@pytest.mark.parametrize("r,h,lq,cap,d,dtype", CASES)
def test_ragged_lengths_match_reference(triton_device, r, h, lq, cap, d, dtype):
    q, kc, vc, kn, vn = _make(r, h, lq, cap, d, dtype, triton_device)
    lens = ragged_lens(r, h, cap, seed=lq).to(triton_device)
    _check(q, kc, vc, lens, kn, vn, d ** -0.5)


def test_long_scale_uniform_lengths(triton_device):
    q, kc, vc, kn, vn = _make(1, 1, 1024, 64, 64, torch.float32, triton_device, seed=2)
    _check(q, kc, vc, torch.full((1, 1), 50, dtype=torch.int32, device=triton_device), kn, vn, 1.0)


def test_strided_views_of_engine_buffers(triton_device):
    """q transposed from [R, Lq, H, D]; cache and new tokens as slices of one full-layout buffer."""
    r, h, lq, n, d = 2, 2, 16, 24, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(r, lq, h, d, generator=gen).to(triton_device).transpose(1, 2)
    kb = torch.randn(r, h, 64, d, generator=gen).to(triton_device)
    vb = torch.randn(r, h, 64, d, generator=gen).to(triton_device)
    lens = torch.full((r, h), n, dtype=torch.int32, device=triton_device)
    kn, vn = kb[:, :, n:n + lq], vb[:, :, n:n + lq]
    out = _check(q, kb, vb, lens, kn, vn, 0.125)
    ref = kv_attention(q.contiguous(), kb[:, :, :n].contiguous(), vb[:, :, :n].contiguous(), lens,
                       kn.contiguous(), vn.contiguous(), 0.125, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_lengths_beyond_capacity_are_clamped_like_the_reference(triton_device):
    q, kc, vc, kn, vn = _make(1, 2, 4, 8, 32, torch.float32, triton_device, seed=6)
    lens = torch.tensor([[3, 20]], dtype=torch.int32, device=triton_device)
    _check(q, kc, vc, lens, kn, vn, 0.3)


def test_empty_scale_gives_empty_output(triton_device):
    q, kc, vc, kn, vn = _make(2, 2, 0, 8, 32, torch.float32, triton_device)
    out = kv_attention(q, kc, vc, torch.zeros(2, 2, dtype=torch.int32, device=triton_device), kn, vn, 1.0,
                       backend="triton")
    assert out.shape == (2, 2, 0, 32)


GPU_CASES = [  # VAR-like shapes (d16 last scales, rows = 2·batch) and the head dims / Lq extremes
    (8, 16, 256, 424, 64), (8, 16, 1, 0, 64), (4, 20, 169, 255, 64), (2, 4, 2048, 512, 128),
    (2, 4, 100, 300, 32), (2, 4, 33, 70, 16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,h,lq,cap,d", GPU_CASES)
def test_gpu_matches_reference(r, h, lq, cap, d, dtype):
    q, kc, vc, kn, vn = _make(r, h, lq, cap, d, dtype, "cuda", seed=lq)
    lens = ragged_lens(r, h, cap, seed=cap).cuda()
    _check(q, kc, vc, lens, kn, vn, d ** -0.5)
    uniform = torch.full((r, h), cap // 2, dtype=torch.int32, device="cuda")
    _check(q, kc, vc, uniform, kn, vn, d ** -0.5)
