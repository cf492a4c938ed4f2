"""Infinity-2B/8B as planning-only named models: geometry, parameter counts, both memory conventions,
`tuner plan` on them, and what every command that runs a model says without their weights (issue 19)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.test_cli_generate import assert_user_error
from tuner.cli.app import build_app
from tuner.cli.policy_opts import placeholder_calibration
from tuner.memory import GIB, max_batch, memory_report
from tuner.memory_conventions import scalekv_convention
from tuner.model.config import model_config
from tuner.model.infinity_config import InfinityConfig
from tuner.model.infinity_schedules import ASPECT_RATIOS, infinity_schedule
from tuner.model.sizing import model_sizing
from tuner.policies.base import PolicySpec
from tuner.policies.full import FullPolicy
from tuner.policies.registry import family_names, make_policy, policy_class, registration
from tuner.policies.scalekv import ScaleKVPolicy

runner = CliRunner()
SIDES_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
SHAPES = {"infinity-2b": (32, 16, 128), "infinity-8b": (40, 28, 128)}  # layers, heads, head_dim


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


def spec_of(name: str) -> PolicySpec:
    cfg = model_config(name)
    return PolicySpec(cfg.geometry, name, placeholder_calibration(cfg))


@pytest.mark.parametrize("name", list(SHAPES))
def test_geometry_is_the_official_1024px_schedule(name):
    cfg = model_config(name)
    g = cfg.geometry
    assert (g.num_layers, g.num_heads, g.head_dim) == SHAPES[name]
    assert g.patch_nums == SIDES_1M and cfg.resolution == 1024
    assert g.seq_len == 10_521 and g.tokens_through(g.num_scales - 2) == 6_425
    assert cfg.engine == "infinity" and cfg.kind == "infinity"


def test_schedules_of_the_official_table():
    assert ASPECT_RATIOS[0] == 0.333 and ASPECT_RATIOS[-1] == 3.0 and len(ASPECT_RATIOS) == 15
    assert [h for h, _ in infinity_schedule(1.0, "0.25M")] == list(SIDES_1M[:10])  # 512px: 10 scales
    two = infinity_schedule(2.0)
    assert two[-1] == (90, 45) and infinity_schedule(0.5)[-1] == (45, 90)
    # equal to the official dynamic_resolution_h_w for all 15 ratios × 4 pixel counts (checked once)
    assert sum(h * w for h, w in two) == 11_269
    g = InfinityConfig(depth=2, embed_dim=256, num_heads=2, h_div_w=2.0).geometry  # (h, w) maps now plan
    assert g.shapes == two and g.patch_nums == tuple(h for h, _ in two) and g.seq_len == 11_269
    with pytest.raises(ValueError, match="aspect ratio"):
        infinity_schedule(1.1)


@pytest.mark.parametrize("name,total,blocks,vae", [
    # Counted on the meta device with the official constructors (Infinity(...) as tools/run_infinity.py
    # builds them, vae_model(...)) at FoundationVision/Infinity @4c27bbb: the formulas must agree.
    ("infinity-2b", 2_204_564_032, 2_148_729_344, 110_118_051),
    ("infinity-8b", 8_375_791_824, 8_223_560_800, 81_624_209),  # the notebook prints "8.38B"
])
def test_parameter_counts_equal_the_official_constructors(name, total, blocks, vae):
    cfg = model_config(name)
    assert cfg.infinity.param_count() == total
    assert cfg.infinity.depth * cfg.infinity.block_params() == blocks
    assert cfg.vae.param_count() == vae
    # flan-t5-xl encoder: 32128·2048 embeddings + 24 layers × (4·2048² + 3·2048·5120 + 2·2048)
    # + 32·32 relative buckets + 2048 final norm
    assert cfg.text_encoder.param_count() == 32128 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 5120 + 2 * 2048) \
        + 32 * 32 + 2048 == 1_223_527_424


def test_weights_as_the_official_inference_holds_them():
    size = model_sizing(model_config("infinity-8b"))
    blocks_bf16, rest_fp32 = 2 * 8_223_560_800, 4 * 152_231_024
    t5_fp16, wo = 2 * (1_223_527_424 - 251_658_240), 4 * 251_658_240
    assert size.weights_bytes == blocks_bf16 + rest_fp32 + 4 * 81_624_209 + t5_fp16 + wo
    # ScaleKV's Table 3 puts 8B's "params" at 19.5 GB: the transformer as held here + T5 all in fp16
    assert round((blocks_bf16 + rest_fp32 + 2 * 1_223_527_424) / 1e9, 1) == 19.5
    assert (size.width, size.logits_per_token, size.decoder_channels) == (3584, 112, 128)


@pytest.mark.parametrize("name,full_bytes", [
    ("infinity-2b", 10_521 * 32 * 2 * 2 * 2048 * 2),   # L × layers × (K, V) × CFG rows × C × fp16
    ("infinity-8b", 10_521 * 40 * 2 * 2 * 3584 * 2),
])
def test_our_full_cache_bytes(name, full_bytes):
    assert full_bytes in (5_516_034_048, 12_066_324_480)
    r = memory_report(FullPolicy(), model_config(name), dtype="fp16", cfg=True)
    assert r.kv_bytes_per_image == r.full_kv_bytes_per_image == full_bytes and r.workspace_tokens == 0


@pytest.mark.parametrize("name,full_mib,tables", [
    # ScaleKV Table 1 / methods.md §0: full cache and 4% / 10% / 20% (265 / 650 / 1300 tokens per layer)
    ("infinity-2b", 38_550, {265: 1_590, 650: 3_900, 1300: 7_800}),
    ("infinity-8b", 84_328, {265: 3_478, 650: 8_531, 1300: 17_062}),
])
def test_scalekv_convention_reproduces_their_table(name, full_mib, tables):
    cfg, spec = model_config(name), spec_of(name)
    g = cfg.geometry
    full = scalekv_convention(FullPolicy().plan(spec), g, batch=8)
    assert full.mib_total == full_mib and full.tokens_per_layer == (6_425.0,) * g.num_layers
    assert full.bytes_per_image == 6_425 * g.num_layers * 2 * g.num_heads * g.head_dim * (4 + 2)
    for tokens, mib in tables.items():
        # their "10%" is 650 of 6,425 tokens (10.12%): our budget_fraction must be given as tokens / 6425
        policy = ScaleKVPolicy(budget_fraction=tokens / 6_425)
        assert policy.uniform_budget(spec) == tokens
        fig = scalekv_convention(policy.plan(spec), g, batch=8)
        assert fig.mib_total == mib and sum(fig.tokens_per_layer) == tokens * g.num_layers


@pytest.mark.parametrize("name,mib", [("infinity-2b", 3_858), ("infinity-8b", 8_439)])
def test_scalekv_budget_fraction_tenth_plans_643_tokens(name, mib):
    """``budget_fraction=0.1`` is round(642.5) = 643 tokens per layer, not the released code's 650."""
    spec = spec_of(name)
    policy = ScaleKVPolicy(budget_fraction=0.10)
    assert policy.uniform_budget(spec) == 643
    assert scalekv_convention(policy.plan(spec), spec.geometry, batch=8).mib_total == mib


def test_scalekv_convention_refuses_quantized_plans():
    spec = spec_of("infinity-2b")
    with pytest.raises(ValueError, match="unquantized"):
        plan = make_policy("window", {"window": 2, "kv_format": "int8"}).plan(spec)
        scalekv_convention(plan, spec.geometry)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("family", [f for f in family_names() if registration(f).product])
def test_every_family_plans_on_infinity(name, family):
    spec = spec_of(name)
    cal = spec.calibration
    g = spec.geometry
    assert len(cal.asi_z()) == g.num_layers and len(cal.heads.dispersion[0]) == g.num_heads
    cases = policy_class(family).conformance_cases(g)  # each family's own parameter matrix
    assert cases
    for case in cases:
        r = memory_report(make_policy(family, case["params"]), model_config(name), spec=spec)
        assert 0 < r.fraction <= 1 and len(r.capacities) == g.num_layers, case
        assert max_batch(r, model_config(name), 80 * GIB).batch >= 1


def test_plan_json_for_scalekv_10_on_infinity_2b():
    r = run("plan", "--model", "infinity-2b", "--family", "scalekv", "--param", "budget_fraction=0.1",
            "--gpu-mem", "80GiB", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["model"] == "infinity-2b" and data["full_kv_bytes_per_image"] == 5_516_034_048
    assert 0.09 < data["fraction"] < 0.12 and data["kv_bytes_per_image"] > 0
    assert data["max_batch"] > 11  # the full cache fits 11 images on 80 GiB
    assert data["scalekv_convention"] == {"bytes_per_image": 643 * 32 * 2 * 2048 * 6, "batch": 8,
                                          "mib_total": 3_858}
    full = json.loads(run("plan", "--model", "infinity-2b", "--family", "full", "--gpu-mem", "80GiB",
                          "--json").output)
    assert full["scalekv_convention"]["mib_total"] == 38_550 and full["max_batch"] == 11


@pytest.mark.parametrize("command", [
    ["generate", "--out", "{tmp}/g"],
    ["bench", "--out", "{tmp}/b.md"],
    ["calibrate", "--out", "{tmp}/c"],
    ["presets", "--out", "{tmp}/p"],
    ["evaluate", "--policy", "full"],
    ["search", "--mem-target", "10%", "--out", "{tmp}/s"],
])
@pytest.mark.parametrize("name", list(SHAPES))
def test_commands_without_infinity_weights_name_the_folder_and_the_way_out(tmp_path, command, name,
                                                                         monkeypatch):
    """Real Infinity weights come from --weights-dir (tests/test_infinity_real_weights.py); without it
    every command says which files it needs, before any file is read or written."""
    monkeypatch.delenv("TUNER_WEIGHTS_DIR", raising=False)
    args = [a.format(tmp=tmp_path) for a in command]
    assert_user_error(run(args[0], "--model", name, *args[1:]), f"--model {name} needs its weights",
                      "--weights-dir", "flan-t5-xl/", "--random-weights")
    assert not any(tmp_path.iterdir())  # nothing written
