"""Storage formats (kernels/quant.py): layout, exact bytes and error bounds of quantize/dequantize.

Bounds (per vector of ``D`` elements, fp16 side values): int8 symmetric absmax ``|e| <= max|x| / 254``
(half a step) plus the fp16 rounding of the scale; int4 asymmetric min/max ``|e| <= (max - min) / 30``
plus the fp16 rounding of scale and zero point (:func:`varkv_kernels.quant.max_abs_error_bound`).
"""
from __future__ import annotations

import pytest
import torch

from varkv_kernels.formats import FORMATS, format_info
from varkv_kernels.quant import dequantize, empty_quantized, max_abs_error_bound, quantize, write_tokens


def data(seed=0, shape=(2, 3, 50, 64), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * scale
    x[0, 0, 0] = 0.0  # an all-zero vector: scale 0, must come back as zeros
    x[0, 0, 1, 5] = 40.0 * scale  # an outlier element
    return x


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_round_trip_error_is_within_the_documented_bound(fmt, scale):
    x = data(scale=scale)
    q = quantize(x, fmt)
    err = (dequantize(q) - x).abs().amax(-1)
    assert bool((err <= max_abs_error_bound(fmt, x) * (1 + 1e-6)).all())
    assert bool((dequantize(q)[0, 0, 0] == 0).all())
    # a relative error that matters: int8 ~0.4% of the vector's largest magnitude, int4 ~3.5% of its range
    rel = float((err / x.abs().amax(-1).clamp_min(1e-30)).median())
    assert rel < (0.005 if fmt == "int8" else 0.12)


def test_int4_packs_two_elements_per_byte_half_split():
    x = torch.arange(8.0).view(1, 1, 1, 8)  # range 0..7 over 16 levels: exact
    q = quantize(x, "int4")
    assert q.data.shape == (1, 1, 1, 4) and q.data.dtype == torch.uint8
    lo, hi = q.data & 0xF, q.data >> 4
    codes = torch.cat((lo, hi), -1).flatten().tolist()
    assert codes == [round(v * 15 / 7) for v in range(8)]  # byte j: element j low, element j + 4 high
    torch.testing.assert_close(dequantize(q), x, atol=7 / 30 + 1e-3, rtol=0)


def test_bytes_per_vector_and_buffers_match_the_formula():
    for name, info in FORMATS.items():
        assert format_info(name) is info
    plain = format_info("compute")
    assert plain.vector_bytes(64, 2) == 128 and plain.vector_bytes(64, 4) == 256
    assert format_info("int8").vector_bytes(64) == 66 and format_info("int4").vector_bytes(64) == 36
    for fmt in ("int8", "int4"):
        buf = empty_quantized(fmt, 2, 3, 10, 64, "cpu")
        assert buf.nbytes == 2 * 3 * 10 * format_info(fmt).vector_bytes(64) and buf.shape == (2, 3, 10, 64)
    with pytest.raises(ValueError, match="unknown KV format 'fp8'"):
        format_info("fp8")
    with pytest.raises(ValueError, match="even head_dim"):
        quantize(torch.zeros(1, 1, 1, 5), "int4")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_write_tokens_stores_the_same_codes_as_quantize(fmt):
    x = data(seed=3, shape=(2, 2, 6, 32))
    buf = empty_quantized(fmt, 2, 2, 10, 32, "cpu")
    write_tokens(buf, 4, x)
    ref = quantize(x, fmt)
    assert torch.equal(buf.narrow(4, 6).data, ref.data) and torch.equal(buf.narrow(4, 6).scale, ref.scale)
    torch.testing.assert_close(dequantize(buf.narrow(4, 6)), dequantize(ref), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_reference_attention_over_a_quantized_cache_equals_it_over_the_dequantized_one(fmt):
    from varkv_kernels.dispatch import kv_attention

    gen = torch.Generator().manual_seed(1)
    q, kn, vn = (torch.randn(2, 3, 5, 32, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(2, 3, 20, 32, generator=gen) for _ in range(2))
    lens = torch.tensor([[0, 7, 20], [3, 20, 11]], dtype=torch.int32)
    qk, qv = quantize(kc, fmt), quantize(vc, fmt)
    got = kv_attention(q, qk, qv, lens, kn, vn, 0.3, backend="torch")
    want = kv_attention(q, dequantize(qk), dequantize(qv), lens, kn, vn, 0.3, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    full = kv_attention(q, kc, vc, lens, kn, vn, 0.3, backend="torch")
    assert float((got - full).abs().max()) < (0.05 if fmt == "int8" else 0.5)
