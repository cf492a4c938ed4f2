"""The zero-generation quality proxy (tuner/quality/proxy.py) on the shipped tiny model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.policies.full import FullPolicy
from tuner.policies.registry import make_policy
from tuner.quality.proxy import (ProxyRecord, ProxySpec, aggregate, cache_path, load_or_record_proxy,
                                 proxy_score, record_proxy)

# One image (two CFG rows) and at most 16 evaluated queries per scale: tiny's 5x5, 6x6 and 8x8 scales are
# subsampled.
SPEC = ProxySpec(samples=1, batch_size=1, max_queries_per_scale=16)


@pytest.fixture(scope="module")
def tiny():
    from tuner.model.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def record(tiny):
    return record_proxy(tiny.var, tiny.vae, tiny.config, SPEC, checkpoint_sha256=tiny.checkpoint_sha256)


def spec_of(record) -> PolicySpec:
    return PolicySpec(record.geometry, record.model_name)


def test_full_cache_and_policies_that_keep_everything_score_exactly_zero(record):
    for policy in (FullPolicy(), make_policy("window", {"window": 99})):
        sc = proxy_score(record, policy, spec_of(record))
        assert sc.score == 0.0 and sc.lost_mass == 0.0
        assert all(e == 0.0 for row in sc.errors for e in row)
        assert sc.per_layer == (0.0,) * record.geometry.num_layers


def test_quantized_all_tokens_lose_a_little_and_no_mass(record):
    int8 = proxy_score(record, FullPolicy(kv_format="int8"), spec_of(record))
    int4 = proxy_score(record, FullPolicy(kv_format="int4"), spec_of(record))
    assert int8.lost_mass == 0.0 and int4.lost_mass == 0.0  # every token is kept, only rounded
    assert 0.0 < max(max(row) for row in int8.errors) < 0.01
    assert int8.errors[0][0] == 0.0  # scale 0 reads no cache
    assert 0.0 < int8.score < int4.score
    evicting = proxy_score(record, make_policy("window", {"window": 7, "max_tokens": 12}), spec_of(record))
    assert int4.score < evicting.score


@pytest.mark.parametrize("family,knob,values,params", [
    ("window", "max_tokens", (4, 12, 28, 60), {"window": 7}),
    ("sink_window", "max_tokens", (4, 12, 28), {"sink_scales": 2, "window": 7}),
    ("budgets", "max_tokens", (4, 16, 40), {"scale_curve": [1.0] * 6, "rule": "scores", "window_size": 8}),
])
def test_more_kept_tokens_score_lower(record, family, knob, values, params):
    scores = [proxy_score(record, make_policy(family, {**params, knob: v}), spec_of(record)) for v in values]
    assert all(a.score > b.score for a, b in zip(scores, scores[1:])), [s.score for s in scores]
    assert all(a.lost_mass > b.lost_mass for a, b in zip(scores, scores[1:]))


def test_score_equals_brute_force_masked_full_attention(record):
    """window with a token cap keeps the ``b = budgets[l][s-1]`` most recent tokens: full attention masked
    to them (plus the scale's own tokens) gives the proxy's error and lost-mass tables."""
    g, cap = record.geometry, 10
    policy = make_policy("window", {"window": 7, "max_tokens": cap})
    sc = proxy_score(record, policy, spec_of(record))
    budgets = policy.plan(spec_of(record)).budgets
    errors = [[0.0] * g.num_scales for _ in range(g.num_layers)]
    lost = [[0.0] * g.num_scales for _ in range(g.num_layers)]
    for layer in range(g.num_layers):
        for s in range(1, g.num_scales):
            hist, through = g.tokens_through(s - 1), g.tokens_through(s)
            off = record.query_offsets[s]
            stored = record.queries[layer, :, :, off:]
            last = s == g.num_scales - 1  # the last scale stores only its evaluated queries
            index = list(range(len(record.eval_index[s]))) if last else list(record.eval_index[s])
            q = stored[:, :, index].double()
            k = record.keys[layer, :, :, :through].double()
            v = record.values[layer, :, :, :through].double()
            p = torch.softmax(q @ k.transpose(-1, -2) * record.softmax_scale, dim=-1)
            allowed = torch.zeros(through, dtype=torch.bool)
            allowed[hist - budgets[layer][s - 1]:] = True
            masked = torch.softmax((q @ k.transpose(-1, -2) * record.softmax_scale)
                                   .masked_fill(~allowed, float("-inf")), dim=-1)
            full_out = p @ v
            errors[layer][s] = float((masked @ v - full_out).norm() / full_out.norm())
            lost[layer][s] = float(p[..., :hist][..., ~allowed[:hist]].sum(-1).mean())
    for layer in range(g.num_layers):
        assert sc.errors[layer] == pytest.approx(errors[layer], rel=1e-4, abs=1e-6)
        assert sc.lost[layer] == pytest.approx(lost[layer], rel=1e-4, abs=1e-6)
    expected = aggregate(tuple(map(tuple, errors)), tuple(map(tuple, lost)), g.scale_lengths)
    assert sc.score == pytest.approx(expected, rel=1e-4)


def test_record_round_trip_and_disk_cache(tiny, record, tmp_path, monkeypatch):
    path = record.save(tmp_path / "r.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and a JSON string: no pickled objects
    assert set(raw) == {"meta", "keys", "values", "queries"}
    assert ProxyRecord.load(path).equal(record)

    sha = tiny.checkpoint_sha256
    cached = cache_path(tiny.config, sha, SPEC, tmp_path)
    record.save(cached)
    monkeypatch.setattr("tuner.quality.proxy_record.record_proxy",
                        lambda *a, **k: pytest.fail("a cached record must not be recorded again"))
    loaded = load_or_record_proxy(tiny.var, tiny.vae, tiny.config, checkpoint_sha256=sha, spec=SPEC,
                                  cache_dir=tmp_path)
    assert loaded.equal(record)
    fp16 = dataclasses.replace(SPEC, store="fp16")
    assert cache_path(tiny.config, sha, fp16, tmp_path) != cached  # the spec is part of the key


def test_bad_inputs_raise_clear_value_errors(record, tmp_path):
    other = CacheGeometry(4, 4, 32, record.geometry.patch_nums)
    with pytest.raises(ValueError, match="proxy record is for 6 layers"):
        proxy_score(record, FullPolicy(), PolicySpec(other))
    with pytest.raises(ValueError, match="keys must be"):
        dataclasses.replace(record, keys=record.keys[:, :, :, :-1])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read proxy record"):
        ProxyRecord.load(bad)
    torch.save({"meta": CacheGeometry(1, 1, 2, (1,))}, bad)  # a pickled object: refused, never run
    with pytest.raises(ValueError, match="proxy record"):
        ProxyRecord.load(bad)
    with pytest.raises(ValueError, match="max_queries_per_scale"):
        ProxySpec(max_queries_per_scale=0)
