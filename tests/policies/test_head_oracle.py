"""The compressed-engine oracle under per-head budgets: every attention call equals full-K/V attention
masked, per head, to exactly the positions that head reports it kept, and each head held exactly its
own budget (``head_budgets[l][s-1][h]``, some heads 0).

Test policies (tests/policies/head_policies.py) give the heads different scale windows and caps, one
head keeping nothing, and choose with each shared selection rule applied per head. They run on the
depth-2 random model of tests/conftest.py and on the built-in ``tiny`` model, with the PyTorch
reference and the Triton kernel (CPU interpreter here), in every storage format.
"""
from __future__ import annotations

import pytest
import torch

from tests.policies.head_policies import HeadWindows
from tests.policies.test_engine_oracle import LABELS, Oracle
from tests.policies.test_quantized_engine import QuantizedOracle
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, PolicySpec


@pytest.fixture(scope="module")
def tiny_model():
    from tuner.model.loading import load_model

    return load_model("tiny")


def check_head_oracle(model, policy: HeadWindows, backend: str = "torch") -> Oracle:
    g = CacheGeometry.from_var_config(model.config.var)
    plan = policy.plan(PolicySpec(g))
    assert plan.per_head
    formats = plan.layer_formats(g.num_layers)
    oracle = Oracle(g) if set(formats) == {"compute"} else QuantizedOracle(g, formats)
    generate(model.var, model.vae, LABELS, seed=3, policy=policy, audit=oracle, backend=backend)
    assert oracle.checked == g.num_layers * g.num_scales
    for (layer, s), counts in oracle.head_counts.items():
        assert counts == (plan.head_budgets[layer][s - 1] if s else (0,) * g.num_heads), (layer, s)
    return oracle


SMALL_POLICIES = [
    HeadWindows(windows=(1, 3), caps=(None, 0)),  # head 0 keeps the last scale, head 1 nothing
    HeadWindows(windows=(2, 4), caps=(3, 7), rule="sink_recent", sink_tokens=1),
    HeadWindows(windows=(4, 2), caps=(6, None), rule="scores"),
]


@pytest.mark.parametrize("policy", SMALL_POLICIES, ids=["recent", "sink_recent", "scores"])
def test_small_model_per_head(small_model, policy):
    oracle = check_head_oracle(small_model, policy)
    counts = set(oracle.head_counts.values())
    assert any(len(set(c)) > 1 for c in counts), "the heads should hold different numbers of tokens"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rule", ["recent", "scores"])
def test_small_model_per_head_quantized(small_model, fmt, rule):
    check_head_oracle(small_model, HeadWindows(windows=(2, 4), caps=(5, 0), rule=rule, kv_format=fmt))


def test_small_model_per_head_triton(small_model):
    check_head_oracle(small_model, HeadWindows(windows=(4, 2), caps=(6, 0), rule="scores"), backend="triton")


TINY_POLICIES = [  # tiny has 4 heads: windows and caps per head, one head (cycled per layer) keeps 0
    HeadWindows(windows=(1, 2, 3, 7), caps=(None, 0, 20, None)),
    HeadWindows(windows=(7, 1, 2, 3), caps=(40, 9, 0, 30), rule="scores"),
    HeadWindows(windows=(2, 7, 1, 3), caps=(12, 0, None, 25), rule="sink_recent", kv_format="int8"),
]


@pytest.mark.parametrize("policy", TINY_POLICIES, ids=["recent", "scores", "sink_recent-int8"])
def test_tiny_model_per_head(tiny_model, policy):
    oracle = check_head_oracle(tiny_model, policy)
    assert any(0 in c and max(c) > 0 for c in oracle.head_counts.values())


def test_tiny_model_per_head_triton_int4(tiny_model):
    check_head_oracle(tiny_model, HeadWindows(windows=(1, 2, 3, 7), caps=(None, 0, 20, None),
                                              kv_format="int4"), backend="triton")


def test_equal_heads_are_bit_identical_to_the_uniform_layout(small_model):
    """A per-head plan whose heads are all alike keeps the same tokens in the packed layout as the
    per-layer plan in the ``[R, H, C, D]`` layout: the images are bit-identical (torch backend)."""
    labels = torch.tensor([0, 5])
    for rule in ("recent", "scores"):
        for fmt in ("compute", "int8"):
            kw = dict(windows=(2,), caps=(6,), rule=rule, kv_format=fmt)
            uniform = generate(small_model.var, small_model.vae, labels, seed=3,
                               policy=HeadWindows(uniform=True, **kw))
            packed = generate(small_model.var, small_model.vae, labels, seed=3, policy=HeadWindows(**kw))
            assert packed.plan.per_head and not uniform.plan.per_head
            assert packed.kv_bytes_allocated == uniform.kv_bytes_allocated
            assert torch.equal(packed.images, uniform.images), (rule, fmt)
