"""Quantized KV storage in the engine: every family × format attends exactly to the dequantized kept
tokens, allocates exactly what the planner counts, and the memory fraction uses 16-bit K/V as the
reference.

The oracle is the compressed-engine oracle of test_engine_oracle.py with one change: its archive of
earlier scales holds each token as its storage format reconstructs it (``dequantize(quantize(k))``,
per vector, the same codes the cache stored), while the current scale's own tokens stay exact. So
a cache that re-quantizes a token when it moves, mixes up scales between tokens or reads a layer in
another format than planned fails here, with the same 1e-4 tolerance as the 16-bit oracle.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from varkv_kernels.quant import dequantize, quantize
from tests.policies.cases import build, cases
from tests.policies.helpers import SMALL, synthetic_calibration
from tests.policies.test_engine_oracle import LABELS, Oracle
from tuner.memory import memory_report
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.registry import family_names, make_policy

FORMATS = ("int8", "int4")


class QuantizedOracle(Oracle):
    """:class:`Oracle` whose archive stores earlier scales as their layer's format reconstructs them."""

    def __init__(self, geometry: CacheGeometry, formats: tuple[str, ...]):
        super().__init__(geometry)
        self.formats = formats

    def __call__(self, rec) -> None:
        fmt = self.formats[rec.layer]
        if fmt == "compute":
            return super().__call__(rec)
        g, layer, s = self.g, rec.layer, rec.scale
        start, n = g.scale_starts[s], g.scale_lengths[s]
        # Check against exact current-scale tokens, then archive them as stored (for later scales).
        exact = dataclasses.replace(rec)
        super().__call__(exact)
        self.k[layer][:, :, start:start + n] = dequantize(quantize(rec.k_new, fmt)).double()
        self.v[layer][:, :, start:start + n] = dequantize(quantize(rec.v_new, fmt)).double()


def compressing_cases() -> list[tuple[str, int]]:
    """Per family: its first case that keeps all tokens (when it has one) and its most aggressive one."""
    out = []
    for family in family_names():
        items = cases(family, SMALL)
        keep_all = [i for i, c in enumerate(items) if c.get("keeps_all")]
        out += [(family, i) for i in sorted({*keep_all[:1], len(items) - 1})]
    return out


def quantized(policy, kv_format):
    return dataclasses.replace(policy, kv_format=kv_format)


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("family,index", compressing_cases())
def test_quantized_cache_attends_to_the_dequantized_kept_tokens_and_allocates_the_plan(
        small_model, family, index, kv_format):
    g = CacheGeometry.from_var_config(small_model.config.var)
    base, _ = build(family, index, g)
    policy = quantized(base, kv_format)
    spec = PolicySpec(g, small_model.config.name, synthetic_calibration(g, seed=index))
    plan = policy.plan(spec)
    assert plan.formats == (kv_format,) * g.num_layers
    oracle = QuantizedOracle(g, plan.layer_formats(g.num_layers))
    res = generate(small_model.var, small_model.vae, LABELS, seed=3, policy=policy, spec=spec, audit=oracle)
    assert oracle.checked == g.num_layers * g.num_scales
    report = memory_report(policy, g, dtype="fp32", spec=spec)
    assert res.kv_bytes_allocated == report.kv_bytes_per_image * len(LABELS)
    # the same plan, 16-bit: quantized storage only ever shrinks the bytes
    assert report.fraction < memory_report(base, g, dtype="fp32", spec=spec).fraction


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_caches_run_under_autocast_and_allocate_the_plan(small_model, dtype):
    """fp16/bf16 runs under autocast (as the official demo does): per-head compaction, score selection
    and the full layout all work on int8/int4 buffers, and allocate exactly the plan in that dtype."""
    g = CacheGeometry.from_var_config(small_model.config.var)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    for family, params in (("full", {"kv_format": "int8"}),
                           ("budgets", {"scale_curve": [1.0] * (g.num_scales - 1), "max_tokens": 6,
                                        "rule": "scores", "window_size": 4, "kv_format": ["int4", "int8"]})):
        policy = make_policy(family, params)
        res = generate(small_model.var, small_model.vae, LABELS, seed=2, policy=policy, dtype=dtype)
        assert torch.isfinite(res.images).all()
        assert res.kv_bytes_allocated == memory_report(policy, g, dtype=name).kv_bytes_per_image * len(LABELS)


def test_layer_groups_mix_formats_per_layer_and_allocate_exactly(small_model):
    g = CacheGeometry.from_var_config(small_model.config.var)  # depth 2: groups of one layer
    policy = make_policy("window", {"window": 2, "kv_format": ["int4", "compute"]})
    spec = PolicySpec(g)
    plan = policy.plan(spec)
    assert plan.formats == ("int4", "compute")
    oracle = QuantizedOracle(g, plan.formats)
    res = generate(small_model.var, small_model.vae, LABELS, seed=1, policy=policy, spec=spec, audit=oracle)
    assert res.kv_bytes_allocated == memory_report(policy, g, dtype="fp32").kv_bytes_per_image * len(LABELS)


def test_groups_cover_contiguous_layers_and_bad_formats_are_refused():
    g = CacheGeometry(6, 4, 32, (1, 2, 3))
    policy = make_policy("window", {"window": 2, "kv_format": ["int8", "int4", "compute"]})
    assert policy.layer_formats(g) == ("int8", "int8", "int4", "int4", "compute", "compute")
    assert make_policy("window", {"kv_format": ["int4"] * 3}).kv_format == "int4"  # one format for all
    assert make_policy("window", {}).params() == {"window": 2, "max_tokens": None}  # 16-bit reads as before
    for bad, why in ((["int8", "int4"] * 4, "1 to 6"), ("int3", "int3"), ([], "1 to 6")):
        with pytest.raises(ValueError, match=why):
            make_policy("window", {"kv_format": bad}).plan(PolicySpec(g))
    with pytest.raises(ValueError, match="even head_dim"):
        make_policy("window", {"kv_format": "int4"}).plan(PolicySpec(CacheGeometry(2, 2, 33, (1, 2))))


def test_memory_fraction_counts_16_bit_whatever_the_run_computes_in():
    """int8 is about half the 16-bit cache in an fp32 run too (never a quarter); bytes per image are
    what a run of that dtype allocates."""
    g = CacheGeometry(30, 30, 64, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # d30
    full16 = memory_report(make_policy("full"), g, dtype="fp16")
    for dtype in ("fp16", "bf16", "fp32"):
        r8 = memory_report(make_policy("full", {"kv_format": "int8"}), g, dtype=dtype)
        r4 = memory_report(make_policy("full", {"kv_format": "int4"}), g, dtype=dtype)
        # per vector of 64: 64 B + one fp16 scale (int8), 32 B + fp16 scale and zero point (int4)
        assert r8.fraction == pytest.approx(66 / 128) and r4.fraction == pytest.approx(36 / 128)
        assert r8.kv_bytes_per_image == 680 * 30 * 2 * 2 * 30 * 66
    assert full16.kv_bytes_per_image == 313_344_000
    window = make_policy("window", {"window": 10, "max_tokens": 100, "kv_format": "int8"})
    r32, r16 = (memory_report(window, g, dtype=d) for d in ("fp32", "fp16"))
    # the workspace stays in the compute dtype: 4 bytes per element in fp32, counted as 2 in the fraction
    ws = 256 * 2 * 2 * 30 * 64  # elements
    assert r32.kv_bytes_per_image == 30 * 100 * 2 * 2 * 30 * 66 + 4 * ws
    assert r16.kv_bytes_per_image == 30 * 100 * 2 * 2 * 30 * 66 + 2 * ws
    assert r32.fraction == r16.fraction == pytest.approx(r16.kv_bytes_per_image / 313_344_000)


def test_full_token_int8_on_tiny_is_near_lossless():
    """All tokens kept in int8: >= 35 dB PSNR against the 16-bit cache (paired, same seeds); int4
    is clearly lossier but still close (measured on 300 images: int8 54.5 dB, int4 30.3 dB)."""
    from tuner.model.loading import load_model
    from tuner.quality.metrics import psnr

    m = load_model("tiny")
    labels = torch.arange(10).repeat(4)
    ref = generate(m.var, m.vae, labels, seed=11).images
    got = {f: generate(m.var, m.vae, labels, seed=11, policy=make_policy("full", {"kv_format": f})).images
           for f in FORMATS}
    assert psnr(got["int8"], ref) >= 35.0
    assert 25.0 <= psnr(got["int4"], ref) < psnr(got["int8"], ref)
