"""Triton ``token_scores`` vs the PyTorch reference (CPU interpreter here, the GPU when present).

The reference upcasts to fp32 and the kernel accumulates q·k in fp32 from the same rounded inputs
(products of fp16/bf16 values are exact in fp32), so the masses differ only by summation order and
exp2-vs-exp: atol 1e-5 / rtol 1e-5 for fp32, 1e-4 / 1e-4 for fp16 and bf16 (masses are in [0, W]).
``-inf`` must appear at exactly the same (invalid) positions.
"""
from __future__ import annotations

import pytest
import torch

from varkv_kernels.dispatch import token_scores
from varkv_kernels.reference import token_scores_reference
from tests.kernels.naive import ragged_lens

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}


def _check(q, keys, lens, scale, pool_kernel):
    got = token_scores(q, keys, lens, scale, pool_kernel=pool_kernel, backend="triton")
    want = token_scores_reference(q, keys, lens, scale, pool_kernel=pool_kernel)
    assert got.dtype == torch.float32 and got.shape == keys.shape[:3]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol)


CASES = [  # r, h, window, candidates, head_dim, dtype, pool
    (2, 3, 16, 100, 64, torch.float32, 0),
    (2, 2, 16, 300, 64, torch.float16, 5),
    (1, 2, 5, 37, 32, torch.float32, 3),
    (1, 2, 16, 50, 64, torch.bfloat16, 0),
    (2, 1, 40, 20, 128, torch.float16, 7),
    (1, 2, 3, 9, 48, torch.float32, 9),  # pool wider than the keys, head_dim padded to 64
]


@pytest.mark.parametrize("r,h,w,n,d,dtype,pool", CASES)
def test_matches_reference(triton_device, r, h, w, n, d, dtype, pool):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(r, h, w, d, generator=gen).to(device=triton_device, dtype=dtype)
    keys = torch.randn(r, h, n, d, generator=gen).to(device=triton_device, dtype=dtype)
    _check(q, keys, ragged_lens(r, h, n, seed=w).to(triton_device), d ** -0.5, pool)


def test_strided_window_and_edge_lengths(triton_device):
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 16, 2, 32, generator=gen).to(triton_device).transpose(1, 2)  # [2, 2, 16, 32] strided
    keys = torch.randn(2, 2, 64, 32, generator=gen).to(triton_device)
    lens = torch.tensor([[0, 1], [64, 99]], dtype=torch.int32, device=triton_device)
    _check(q, keys, lens, 1.0, 3)
    # The window's mass over the valid keys is one per query.
    got = token_scores(q, keys, lens, 1.0, backend="triton")
    torch.testing.assert_close(got[1, 0].sum().cpu(), torch.tensor(16.0), atol=1e-4, rtol=0)
    assert torch.isinf(got[0, 0]).all()


def test_empty_window_and_no_candidates(triton_device):
    q = torch.zeros(1, 2, 0, 32, device=triton_device)
    keys = torch.randn(1, 2, 5, 32, device=triton_device)
    lens = torch.tensor([[5, 2]], dtype=torch.int32, device=triton_device)
    got = token_scores(q, keys, lens, 1.0, backend="triton")
    assert torch.equal(got.cpu(), token_scores_reference(q, keys, lens, 1.0).cpu())
    none = token_scores(torch.randn(1, 2, 4, 32, device=triton_device), keys[:, :, :0], lens * 0, 1.0,
                        backend="triton")
    assert none.shape == (1, 2, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,h,w,n,d,pool", [(8, 16, 16, 680, 64, 5), (4, 30, 16, 255, 64, 0),
                                            (2, 4, 64, 1000, 128, 3), (2, 4, 7, 33, 16, 1)])
def test_gpu_matches_reference(r, h, w, n, d, pool, dtype):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(r, h, w, d, generator=gen).to(device="cuda", dtype=dtype)
    keys = torch.randn(r, h, n, d, generator=gen).to(device="cuda", dtype=dtype)
    _check(q, keys, ragged_lens(r, h, n, seed=w).cuda(), d ** -0.5, pool)
