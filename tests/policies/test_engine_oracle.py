"""The compressed engine's correctness oracle: every attention call under a policy equals full-K/V
attention masked to exactly the positions the cache reports it kept.

The oracle keeps its own archive of every key and value each layer produced in the run (taken from
the model's projections, before the cache touches them) and, per (row, head), attends the current
scale's queries to the archived tokens at the reported positions plus the scale's own tokens (under
per-head budgets each head reports its own count). It never reads the cache's buffers, so a cache
that keeps K and V misaligned, or reports other positions than it attends to, fails here. Every
family and case of the conformance data runs, per head where a family selects per head, on the
depth-2 random model (per-head plans: tests/policies/test_head_oracle.py).
"""
from __future__ import annotations

import pytest
import torch

from tests.policies.cases import build, case_ids, cases
from tests.policies.helpers import SMALL, synthetic_calibration
from tuner.model.generate import generate
from tuner.policies.base import CacheGeometry, PolicySpec

LABELS = torch.tensor([2, 6])


class Oracle:
    """Archives K/V per layer and checks each recorded attention call against masked full attention."""

    def __init__(self, geometry: CacheGeometry):
        self.g = geometry
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.checked = 0
        self.worst = 0.0
        self.kept_counts: dict[tuple[int, int], int] = {}
        self.head_counts: dict[tuple[int, int], tuple[int, ...]] = {}

    def __call__(self, rec) -> None:
        g, layer, s = self.g, rec.layer, rec.scale
        start, n = g.scale_starts[s], g.scale_lengths[s]
        if layer not in self.k:
            rows, heads, _, d = rec.k_new.shape
            self.k[layer] = torch.zeros(rows, heads, g.seq_len, d, dtype=torch.float64)
            self.v[layer] = torch.zeros(rows, heads, g.seq_len, d, dtype=torch.float64)
        self.k[layer][:, :, start:start + n] = rec.k_new.double()
        self.v[layer][:, :, start:start + n] = rec.v_new.double()
        kept = rec.kept_positions
        # Per-head plans: head h holds kept_lens[h] ids, then -1 (ignored).
        lens = rec.kept_lens if rec.kept_lens is not None else (kept.shape[-1],) * kept.shape[1]
        valid = torch.arange(kept.shape[-1]).view(1, -1) < torch.tensor(lens).view(-1, 1)  # [H, n]
        assert bool(((kept >= 0) == valid).all()), "ids must be a per-head valid prefix, -1 after it"
        assert bool(((kept < start) | ~valid).all()), "a kept position is not from an earlier scale"
        if kept.shape[-1] > 1:
            assert bool(((kept[..., 1:] > kept[..., :-1]) | ~valid[:, 1:]).all()), \
                "kept positions must be unique"
        self.kept_counts[(layer, s)] = kept.shape[-1]
        self.head_counts[(layer, s)] = tuple(lens)
        hits = torch.zeros(*kept.shape[:2], start + n, dtype=torch.int64)
        hits.scatter_add_(2, kept.clamp_min(0), valid.expand_as(kept).long())
        allowed = hits > 0
        allowed[:, :, start:start + n] = True
        keys, values = self.k[layer][:, :, :start + n], self.v[layer][:, :, :start + n]
        scores = torch.einsum("rhqd,rhkd->rhqk", rec.q.double(), keys) * rec.softmax_scale
        scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        expected = torch.einsum("rhqk,rhkd->rhqd", scores.softmax(-1), values)
        err = float((rec.out.double() - expected).abs().max())
        self.worst = max(self.worst, err)
        assert err < 1e-4, f"layer {layer} scale {s}: attention differs from the oracle by {err:.3g}"
        self.checked += 1


# Every case with the PyTorch reference; one compressing case per family through the Triton kernel too
# (under the CPU interpreter it is ~20x slower; the kernel itself is compared with the reference in
# tests/kernels on many more shapes).
def runs(families: list[str] | None = None) -> list[tuple[str, int, str]]:
    ids = case_ids(families)
    names = list(dict.fromkeys(f for f, _ in ids))
    triton = [(f, min(1, len(cases(f, SMALL)) - 1), "triton") for f in names]
    return [(f, i, "torch") for f, i in ids] + triton


def check_attention_oracle(small_model, family: str, index: int, backend: str) -> Oracle:
    """Generate under one case with the oracle as the cache's audit; every attention call is checked."""
    g = CacheGeometry.from_var_config(small_model.config.var)
    policy, _ = build(family, index, g)
    spec = PolicySpec(g, small_model.config.name, synthetic_calibration(g, seed=index))
    oracle = Oracle(g)
    res = generate(small_model.var, small_model.vae, LABELS, seed=3, policy=policy, spec=spec, audit=oracle,
                   backend=backend)
    assert oracle.checked == g.num_layers * g.num_scales
    for (layer, s), count in oracle.kept_counts.items():  # the cache held exactly its budget
        expected = g.tokens_through(s - 1) if res.plan.full else (res.plan.budgets[layer][s - 1] if s else 0)
        assert count == expected, (layer, s)
    return oracle


@pytest.mark.parametrize("family,index,backend", runs())
def test_attention_equals_full_attention_masked_to_the_kept_positions(small_model, family, index, backend):
    check_attention_oracle(small_model, family, index, backend)
