"""What the head-aware families promise beyond the conformance suite: HACK's groups and budgets,
HeatKV's schedule, the budgets family's head split, the calibration's per-head summary and the
policy file's head table."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.policies.helpers import D30, TINY, synthetic_calibration
from tuner.errors import UserError
from tuner.model.config import model_config
from tuner.policies.base import PolicySpec, cached_before_last
from tuner.policies.budgets import BudgetsPolicy
from tuner.policies.hack import HACKPolicy
from tuner.policies.heatkv import HeatKVPolicy

SPEC = PolicySpec(TINY, "tiny", synthetic_calibration(TINY, seed=3))


def capacities(plan, g):
    return [plan.head_capacities(layer, g.num_heads) for layer in range(g.num_layers)]


@pytest.mark.parametrize("g", [TINY, D30], ids=["tiny", "d30"])
def test_hack_contextual_heads_are_the_most_dispersed_and_get_the_small_budget(g):
    spec = PolicySpec(g, "x", synthetic_calibration(g, seed=1))
    policy = HACKPolicy(budget_fraction=0.3, contextual_fraction=0.25, contextual_ratio=0.2)
    b_c, b_s = policy.group_budgets(g)
    assert b_c < b_s
    alpha = policy.contextual_count(g) / (g.num_layers * g.num_heads)
    assert alpha * b_c + (1 - alpha) * b_s == pytest.approx(0.3 * cached_before_last(g), abs=1.0)
    disp = spec.calibration.heads.dispersion
    caps = capacities(policy.plan(spec), g)
    contextual = {(lay, h) for lay in range(g.num_layers) for h in range(g.num_heads) if caps[lay][h] == b_c}
    assert len(contextual) == policy.contextual_count(g)
    lowest_contextual = min(disp[lay][h] for lay, h in contextual)
    assert all(disp[lay][h] <= lowest_contextual for lay in range(g.num_layers) for h in range(g.num_heads)
               if (lay, h) not in contextual)  # ranked over the whole model, not per layer


def test_hack_structural_heads_keep_sinks_and_the_newest_scale():
    from tests.policies.helpers import simulate

    policy = HACKPolicy(budget_fraction=0.4, contextual_fraction=0.5, contextual_ratio=0.1, sink_scales=2)
    g, plan = TINY, policy.plan(SPEC)
    kept = simulate(policy, SPEC)
    b_c, b_s = policy.group_budgets(g)
    sinks = g.tokens_through(1)
    checked = 0
    for layer in range(g.num_layers):
        for s in range(1, g.num_scales - 1):
            for h, k in enumerate(plan.head_budgets[layer][s]):
                if k != b_s or k >= g.tokens_through(s):
                    continue  # only structural heads that had to choose
                ids = kept[layer][s][:, h, :k]
                start, n = g.scale_starts[s], g.scale_lengths[s]
                need = set(range(sinks)) | set(range(start, start + min(n, k - sinks)))
                for row in ids.tolist():
                    assert need <= set(row), (layer, s, h)
                checked += 1
    assert checked


def test_heatkv_keeps_whole_scales_by_scas_and_protects_the_first():
    g = TINY
    heads = SPEC.calibration.heads
    policy = HeatKVPolicy(keep_fraction=0.4, protected_scales=2)
    plan = policy.plan(SPEC)
    kept = policy.kept_atoms(SPEC)
    prunable = [(lay, h, j) for lay in range(g.num_layers) for h in range(g.num_heads)
                for j in range(2, g.num_scales - 1)]
    assert len(kept) == math.floor(0.4 * len(prunable) + 0.5)
    worst_kept = min(heads.scas[lay][h][j] for lay, h, j in kept)
    assert all(heads.scas[lay][h][j] <= worst_kept for lay, h, j in prunable if (lay, h, j) not in kept)
    for lay in range(g.num_layers):
        for h in range(g.num_heads):
            row = [plan.head_budgets[lay][s][h] for s in range(g.num_scales)]
            want = [sum(g.scale_lengths[j] for j in range(s + 1) if j < 2 or (lay, h, j) in kept)
                    for s in range(g.num_scales - 1)] + [0]
            assert row == want


def test_heatkv_default_protection_and_token_count():
    # tiny: 91 tokens before the last scale, 1% of that is below scale 0+1's 5 tokens: only scale 0
    assert HeatKVPolicy().protected(SPEC) == 1
    assert HeatKVPolicy().protected(PolicySpec(D30, "d30", synthetic_calibration(D30))) == 1
    policy = HeatKVPolicy(keep_fraction=0.3, count="tokens")
    held = sum(TINY.scale_lengths[j] for *_, j in policy.kept_atoms(SPEC))
    total = TINY.num_layers * TINY.num_heads * sum(TINY.scale_lengths[1:-1])
    assert held >= 0.3 * total and held - max(TINY.scale_lengths[1:-1]) < 0.3 * total


@pytest.mark.parametrize("family", [HACKPolicy, HeatKVPolicy])
def test_memory_grows_with_the_knob(family):
    from tuner.memory import memory_report

    knob = family().memory_knob(TINY)
    values = [knob.low + (knob.high - knob.low) * i / 8 for i in range(9)]
    mem = [memory_report(knob.apply(v), TINY, spec=SPEC).kv_bytes_per_image for v in values]
    assert mem == sorted(mem) and mem[0] < mem[-1]


def test_budgets_head_split_keeps_each_layers_mean_and_needs_calibration():
    ones = (1.0,) * (TINY.num_scales - 1)
    plain = BudgetsPolicy(scale_curve=ones, max_tokens=20)
    split = BudgetsPolicy(scale_curve=ones, max_tokens=20, contextual_weight=0.25)
    assert not plain.needs_calibration and split.needs_calibration and split.needs_head_calibration
    with pytest.raises(ValueError, match="per-head calibration"):
        split.plan(PolicySpec(TINY))
    p0, p1 = plain.plan(SPEC), split.plan(SPEC)
    assert not p0.per_head and p1.per_head
    roles = SPEC.calibration.heads.contextual(0.5)
    for layer in range(TINY.num_layers):
        caps = p1.head_capacities(layer, TINY.num_heads)
        c = [cap for cap, r in zip(caps, roles[layer]) if r]
        s = [cap for cap, r in zip(caps, roles[layer]) if not r]
        assert all(x < y for x in c for y in s)
        assert abs(sum(caps) - TINY.num_heads * p0.capacity(layer)) <= TINY.num_heads  # rounding per head
    with pytest.raises(ValueError, match="contextual_weight"):
        BudgetsPolicy(table=((1,) * TINY.num_scales,) * TINY.num_layers, contextual_weight=0.5)


def test_policy_file_records_and_checks_the_head_table(tmp_path):
    from tuner.policy_file import describe_policy_file, load_policy_file, write_policy_file

    cfg = model_config("tiny")
    policy = HACKPolicy(budget_fraction=0.2)
    path = write_policy_file(tmp_path / "p.json", policy, cfg, spec=SPEC)
    doc = json.loads(path.read_text())
    assert doc["head_budgets"] == [[list(h) for h in layer] for layer in policy.plan(SPEC).head_budgets]
    assert doc["calibration"]["heads"]["dispersion"]
    _, info = load_policy_file(path, cfg)
    assert "per-head capacities" in describe_policy_file(policy, info)
    doc["head_budgets"][0][-2][0] -= 1  # still a valid plan (the last scale keeps 0), not this policy's
    doc["budgets"][0][-2] = max(doc["head_budgets"][0][-2])
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="budget table differs"):
        load_policy_file(tmp_path / "edited.json", cfg)
    doc["head_budgets"][0][2][0] = "3"
    (tmp_path / "typed.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"head_budgets\[0\]\[2\]\[0\]' must be an integer"):
        load_policy_file(tmp_path / "typed.json", cfg)
    # a per-layer family's file embeds no head statistics (files stay as small as they were)
    scalekv = write_policy_file(tmp_path / "s.json", make_scalekv(), cfg, spec=SPEC)
    assert "heads" not in json.loads(scalekv.read_text())["calibration"]
    assert "head_budgets" not in json.loads(scalekv.read_text())


def make_scalekv():
    from tuner.policies.scalekv import ScaleKVPolicy

    return ScaleKVPolicy(budget_fraction=0.2)


def test_calibration_measures_the_head_summary_in_the_same_pass(small_model):
    from tuner.calibration import CalibrationSpec, calibrate
    from tuner.calibration_head_summary import HeadCalibration
    from tuner.calibration_heads import HeadSpec, compute_head_stats

    spec = CalibrationSpec(samples=2, batch_size=2)
    cal = calibrate(small_model.var, small_model.vae, small_model.config, spec=spec)
    stats = compute_head_stats(small_model.var, small_model.vae, small_model.config, HeadSpec(images=spec))
    assert cal.heads == HeadCalibration.from_measured(stats.mass, stats.dispersion)
    again = type(cal).from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    old = {k: v for k, v in cal.to_dict().items() if k != "heads"}  # saved by an older tuner
    assert type(cal).from_dict(old).heads is None
    assert torch.isfinite(torch.tensor([v for row in cal.heads.dispersion for v in row])).all()
