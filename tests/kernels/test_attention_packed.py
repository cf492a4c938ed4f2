"""``kv_attention`` over a packed cache with per-head capacities (:class:`varkv_kernels.packed.PackedKV`).

Head ``h``'s tokens are one segment of a ``[R, 1, Σ_h C_h, D]`` store; it reads the first
``min(cache_lens[r, h], C_h)`` of them. Checked: the PyTorch reference against explicit float64 loops
over each head's own segment (compute, int8, int4: the loops read the dequantized codes), the Triton
kernels (CPU interpreter here, the GPU when present) against the reference with the tolerances of
tests/kernels/test_attention_triton.py and test_attention_quantized.py, capacities and lengths
including 0, and a packed cache of equal capacities against the ``[R, H, C, D]`` layout.
"""
from __future__ import annotations

import pytest
import torch

from varkv_kernels.dispatch import kv_attention
from varkv_kernels.packed import PackedKV, pack_heads, unpack_prefix
from varkv_kernels.quant import dequantize, quantize
from varkv_kernels.reference import kv_attention_reference
from tests.kernels.naive import naive_kv_attention

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
FORMATS = ("compute", "int8", "int4")


def make(r, caps, lq, d, dtype, device, fmt, seed=0):
    """q, packed K/V caches with per-head ``caps``, k_new, v_new (one seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    h = len(caps)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, kn, vn = rand(r, h, lq, d), rand(r, h, lq, d), rand(r, h, lq, d)
    caches = []
    for _ in range(2):
        segs = [rand(r, c, d) for c in caps]
        caches.append(pack_heads(segs if fmt == "compute" else [quantize(s.unsqueeze(1), fmt) for s in segs]))
    return q, caches[0], caches[1], kn, vn


def ragged(r, caps, seed, over: int = 0):
    """int32 ``[r, H]`` lengths per head in ``[0, C_h + over]``, with 0 and each head's capacity present."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.stack([torch.randint(0, c + over + 1, (r,), generator=gen) for c in caps], dim=1)
    lens[0] = torch.tensor(caps)
    if r > 1:
        lens[1, 0] = 0
    return lens.to(torch.int32)


def dense(p: PackedKV) -> torch.Tensor:
    """``[R, H, max C_h, D]`` float64 of every head's whole segment (dequantized), zeros after it."""
    return unpack_prefix(p, p.capacities, torch.float64)


def check_triton(q, kc, vc, lens, kn, vn, scale):
    out = kv_attention(q, kc, vc, lens.to(q.device), kn, vn, scale, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    if kc.fmt == "compute":  # the reference in fp32 over the same rounded values
        kc, vc = (PackedKV(t.store.float(), t.offsets, t.capacities) for t in (kc, vc))
    ref = kv_attention_reference(q.float(), kc, vc, lens.to(q.device), kn.float(), vn.float(), scale)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out


CAPS = [(5, 0, 9), (0, 0), (3,), (17, 1, 0, 40)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("caps", CAPS, ids=str)
def test_reference_reads_each_heads_own_segment(fmt, caps):
    r, lq, d = 3, 4, 32
    q, kc, vc, kn, vn = make(r, caps, lq, d, torch.float32, "cpu", fmt, seed=len(caps))
    lens = ragged(r, caps, seed=1, over=3)  # some lengths beyond the head's capacity: clamped
    out = kv_attention(q, kc, vc, lens, kn, vn, 0.2, backend="torch")
    clamped = torch.minimum(lens, torch.tensor(caps, dtype=torch.int32))
    expected = naive_kv_attention(q, dense(kc), dense(vc), clamped, kn, vn, 0.2)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


TRITON_CASES = [  # r, caps, lq, head_dim, dtype
    (2, (5, 0, 40), 16, 64, torch.float32),
    (2, (70, 3), 9, 128, torch.float16),
    (1, (0, 33), 1, 32, torch.float32),
    (2, (0, 0), 4, 32, torch.float16),  # no head holds anything: nothing of the cache is read
    (2, (40, 16), 16, 64, torch.bfloat16),
    (2, (150, 0, 90), 100, 64, torch.float16),  # several key blocks in both stages
    (1, (20, 7), 5, 80, torch.float32),  # head_dim not a power of two
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("r,caps,lq,d,dtype", TRITON_CASES)
def test_triton_matches_reference(triton_device, fmt, r, caps, lq, d, dtype):
    q, kc, vc, kn, vn = make(r, caps, lq, d, dtype, triton_device, fmt, seed=lq)
    check_triton(q, kc, vc, ragged(r, caps, seed=d, over=2), kn, vn, d ** -0.5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_equal_capacities_match_the_unpacked_layout(triton_device, fmt):
    """Packed with every head at capacity C == the ``[R, H, C, D]`` buffer with the same tokens, on both
    backends (the reference bit for bit: it attends to the same values the same way)."""
    r, h, c, lq, d = 2, 3, 12, 6, 32
    q, kc, vc, kn, vn = make(r, (c,) * h, lq, d, torch.float32, triton_device, fmt, seed=9)

    def unpacked(p: PackedKV):
        s = p.store
        if fmt == "compute":
            return s.reshape(r, h, c, d)
        return type(s)(s.fmt, s.data.reshape(r, h, c, -1), s.scale.reshape(r, h, c),
                       None if s.zero is None else s.zero.reshape(r, h, c), d)

    lens = ragged(r, (c,) * h, seed=4)
    for backend in ("torch", "triton"):
        a = kv_attention(q, kc, vc, lens.to(triton_device), kn, vn, 0.3, backend=backend)
        b = kv_attention(q, unpacked(kc), unpacked(vc), lens.to(triton_device), kn, vn, 0.3, backend=backend)
        if backend == "torch":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_strided_queries_and_new_tokens(triton_device):
    r, caps, lq, d = 2, (9, 0, 24), 16, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(r, lq, len(caps), d, generator=gen).to(triton_device).transpose(1, 2)
    _, kc, vc, _, _ = make(r, caps, lq, d, torch.float32, triton_device, "int8", seed=2)
    new = torch.randn(2, r, len(caps), 32, d, generator=gen).to(triton_device)
    kn, vn = new[0, :, :, 4:4 + lq], new[1, :, :, 10:10 + lq]
    check_triton(q, kc, vc, ragged(r, caps, seed=3), kn, vn, 0.125)


def test_quantized_packed_reference_reads_the_stored_codes():
    """The int formats' reference reads exactly ``dequantize`` of each head's codes."""
    caps = (4, 0, 6)
    q, kc, vc, kn, vn = make(2, caps, 3, 32, torch.float32, "cpu", "int4", seed=7)
    segs = [dequantize(kc.segment(h), torch.float64)[:, 0] for h in range(3)]
    assert all(torch.equal(dense(kc)[:, h, :c], segs[h]) for h, c in enumerate(caps))


def test_bad_packed_arguments_are_refused():
    q, kc, vc, kn, vn = make(1, (3, 2), 2, 32, torch.float32, "cpu", "compute")
    lens = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="both be PackedKV"):
        kv_attention(q, kc, torch.zeros(1, 2, 3, 32), lens, kn, vn, 1.0, backend="torch")
    _, kc2, _, _, _ = make(1, (2, 3), 2, 32, torch.float32, "cpu", "compute")
    with pytest.raises(ValueError, match="different head capacities"):
        kv_attention(q, kc, kc2, lens, kn, vn, 1.0, backend="torch")
    _, k3, v3, _, _ = make(1, (1, 1, 1), 2, 32, torch.float32, "cpu", "compute")
    with pytest.raises(ValueError, match="packed for 3 heads"):
        kv_attention(q, k3, v3, lens, kn, vn, 1.0, backend="torch")
    short = PackedKV(kc.store[:, :, :4], kc.offsets, kc.capacities)
    with pytest.raises(ValueError, match="packed store must be"):
        kv_attention(q, short, short, lens, kn, vn, 1.0, backend="torch")


GPU_CASES = [  # VAR-like: d16 last scale with ragged per-head capacities (rows = 2·batch), head_dim 128
    (8, tuple((i * 37) % 300 for i in range(16)), 256, 64), (2, (70, 0, 5, 128), 33, 128),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,caps,lq,d", GPU_CASES)
def test_gpu_matches_reference(r, caps, lq, d, dtype, fmt):
    q, kc, vc, kn, vn = make(r, caps, lq, d, dtype, "cuda", fmt, seed=lq)
    check_triton(q, kc, vc, ragged(r, caps, seed=d, over=5), kn, vn, d ** -0.5)
