"""The PyTorch reference ops against explicit float64 loops, and the reference's bit-identity.

Tolerances (fp32 inputs vs float64 loops): 1e-5 absolute for attention outputs and window masses.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from varkv_kernels.reference import kv_attention_reference, token_scores_reference, uniform_length
from tests.kernels.naive import naive_kv_attention, naive_token_scores, ragged_lens


def _inputs(r, h, lq, cap, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in
            ((r, h, lq, d), (r, h, cap, d), (r, h, cap, d), (r, h, lq, d), (r, h, lq, d))]


@pytest.mark.parametrize("r,h,lq,cap,d", [(2, 3, 5, 12, 16), (1, 4, 1, 7, 32), (3, 2, 9, 0, 8)])
def test_ragged_attention_matches_naive(r, h, lq, cap, d):
    q, kc, vc, kn, vn = _inputs(r, h, lq, cap, d)
    lens = ragged_lens(r, h, cap, seed=1)
    out = kv_attention_reference(q, kc, vc, lens, kn, vn, d ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), naive_kv_attention(q, kc, vc, lens, kn, vn, d ** -0.5),
                               atol=1e-5, rtol=0)


def test_uniform_attention_matches_naive_and_ignores_tokens_past_length():
    q, kc, vc, kn, vn = _inputs(2, 2, 4, 10, 16)
    lens = torch.full((2, 2), 6, dtype=torch.int32)
    out = kv_attention_reference(q, kc, vc, lens, kn, vn, 0.7)
    want = naive_kv_attention(q, kc, vc, lens, kn, vn, 0.7)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    kc[:, :, 6:] = 1e4  # garbage beyond the valid prefix must not matter
    assert torch.equal(kv_attention_reference(q, kc, vc, lens, kn, vn, 0.7), out)


def test_same_values_through_different_buffers_are_bit_identical():
    r, h, lq, n, d = 2, 3, 9, 14, 64
    q, kc, vc, kn, vn = _inputs(r, h, lq, n, d, seed=3)
    expected = F.scaled_dot_product_attention(q, torch.cat((kc, kn), 2), torch.cat((vc, vn), 2), scale=1.0)
    # The engine's full layout: one big buffer holding the cache prefix and the new tokens after it.
    big_k = torch.randn(r, h, 40, d)
    big_v = torch.randn(r, h, 40, d)
    big_k[:, :, :n], big_k[:, :, n:n + lq] = kc, kn
    big_v[:, :, :n], big_v[:, :, n:n + lq] = vc, vn
    # A compressed layout: a cache buffer with spare capacity and a separate workspace.
    ws_k, ws_v = torch.zeros(r, h, 30, d), torch.zeros(r, h, 30, d)
    ws_k[:, :, :lq], ws_v[:, :, :lq] = kn, vn
    lens32 = torch.full((r, h), n, dtype=torch.int32)
    outs = [
        kv_attention_reference(q, kc, vc, lens32, kn, vn, 1.0),
        kv_attention_reference(q, kc, vc, lens32, kn, vn, 1.0, uniform_len=n),
        kv_attention_reference(q, big_k, big_v, lens32, big_k[:, :, n:n + lq], big_v[:, :, n:n + lq], 1.0),
        kv_attention_reference(q, big_k, big_v, lens32.long(), ws_k[:, :, :lq], ws_v[:, :, :lq], 1.0,
                               uniform_len=n),
    ]
    for out in outs:
        assert torch.equal(out, expected)


def test_uniform_length():
    assert uniform_length(torch.full((2, 3), 5, dtype=torch.int32)) == 5
    assert uniform_length(torch.tensor([[5, 4]], dtype=torch.int32)) is None
    assert uniform_length(torch.zeros(0, 2, dtype=torch.int32)) == 0


@pytest.mark.parametrize("pool_kernel", [0, 1, 3, 5])
def test_token_scores_match_naive(pool_kernel):
    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(2, 3, 6, 16, generator=gen), torch.randn(2, 3, 11, 16, generator=gen)
    lens = ragged_lens(2, 3, 11, seed=5)
    got = token_scores_reference(q, keys, lens, 0.5, pool_kernel=pool_kernel)
    want = naive_token_scores(q, keys, lens, 0.5, pool_kernel)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 11)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-5, rtol=0)


def test_token_scores_mass_sums_to_window_size():
    gen = torch.Generator().manual_seed(6)
    q, keys = torch.randn(1, 2, 7, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
    lens = torch.tensor([[20, 3]], dtype=torch.int32)
    got = token_scores_reference(q, keys, lens, 1.0)
    assert torch.isinf(got[0, 1, 3:]).all()
    torch.testing.assert_close(got[0, 0].sum(), torch.tensor(7.0))
    torch.testing.assert_close(got[0, 1, :3].sum(), torch.tensor(7.0))
