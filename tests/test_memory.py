"""Memory planner: docs/design.md, Memory figures, plan arithmetic, sizing and the size grammar."""
from __future__ import annotations

import pytest

from tests.policies.helpers import D30, SMALL
from tuner.errors import UserError
from tuner.mem_target import parse_mem_target, parse_size
from tuner.memory import GIB, format_plan_table, max_batch, memory_report, plot_budget_heatmap
from tuner.model.config import model_config
from tuner.policies.base import CachePlan
from tuner.policies.full import FullPolicy
from tuner.policies.window import WindowPolicy


@pytest.mark.parametrize("name,full_bytes", [("d16", 89_128_960), ("d20", 139_264_000), ("d24", 200_540_160),
                                             ("d30", 313_344_000), ("d36", 1_486_356_480)])
def test_full_cache_bytes_from_design(name, full_bytes):
    r = memory_report(FullPolicy(), model_config(name), dtype="fp16", cfg=True)
    assert r.kv_bytes_per_image == r.full_kv_bytes_per_image == full_bytes
    assert r.fraction == 1.0 and r.workspace_tokens == 0


def test_policy_bytes_are_capacities_plus_workspace():
    # d30 window 1: capacity = the largest non-last scale (169) in each of 30 layers, workspace 256
    r = memory_report(WindowPolicy(1), model_config("d30"), dtype="fp16", batch=4)
    assert r.capacities == (169,) * 30 and r.workspace_tokens == 256
    assert r.kv_bytes_per_image == (30 * 169 + 256) * 15_360 == 81_807_360
    assert r.kv_bytes_total == 4 * 81_807_360
    assert r.fraction == pytest.approx(5326 / 20400)
    assert memory_report(WindowPolicy(1), D30, dtype="fp32", cfg=False).kv_bytes_per_image == 81_807_360


def test_resident_curve():
    # SMALL: 2 layers, scales 1 4 9 16; plan by hand
    plan = CachePlan(((1, 5, 6, 0), (1, 3, 12, 0)))
    r = memory_report(plan, SMALL, dtype="fp32", cfg=False)
    per_token = 2 * 2 * 64 * 4
    # live tokens while layer l attends at scale s: layers < l hold their new budget, layers >= l the
    # old one, plus the workspace with scale s. s=1: layer 1 attends with 5 + 1 + 4 = 10;
    # s=2: layer 1 with 6 + 3 + 9 = 18; s=3: layer 0 with 6 + 12 + 16 = 34
    assert r.resident_bytes_per_scale == tuple(t * per_token for t in (2, 10, 18, 34))
    full = memory_report(FullPolicy(), SMALL, dtype="fp32", cfg=False)
    assert full.resident_bytes_per_scale == tuple(2 * t * per_token for t in (1, 5, 14, 30))


def test_invalid_plans_raise():
    with pytest.raises(ValueError, match="exceeds"):
        memory_report(CachePlan(((1, 6, 0, 0), (1, 1, 0, 0))), SMALL)
    with pytest.raises(UserError, match="dtype"):
        memory_report(FullPolicy(), SMALL, dtype="int3")


def test_max_batch_arithmetic():
    cfg = model_config("d16")
    r = memory_report(WindowPolicy(2), cfg, dtype="fp16")
    est = max_batch(r, cfg, 24 * GIB, "fp16")
    per_image = est.kv_bytes_per_image + est.activation_bytes_per_image
    free = 24 * GIB - est.weights_bytes - est.reserve_bytes
    assert est.batch * per_image <= free < (est.batch + 1) * per_image
    assert est.weights_bytes == 4 * (310_283_520 + 108_948_355)  # official d16 VAR + VQ-VAE, fp32
    assert est.kv_bytes_per_image == r.kv_bytes_per_image
    text = est.describe()
    assert "fp32" in text and "CUDA context" in text and f"max batch {est.batch}" in text
    assert max_batch(r, cfg, 2 * GIB, "fp16").batch == 0


def test_parse_size_and_targets():
    assert parse_size("40MiB") == 41_943_040
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("800kB") == 800_000 and parse_size("512") == 512
    t = parse_mem_target("15%")
    assert (t.fraction, t.bytes_per_image, t.text) == (0.15, None, "15%")
    assert parse_mem_target("0.15").fraction == 0.15
    t = parse_mem_target("40MiB")
    assert t.bytes_per_image == 41_943_040 and t.fraction is None
    assert parse_mem_target("100%").fraction == 1.0
    for bad, match in [("0", "outside"), ("150%", "outside"), ("abc", "not a size"), ("0MiB", "positive"),
                       ("2", "more than the full cache"), ("%", "not a percentage"),
                       ("12 parsecs", "not a size")]:
        with pytest.raises(UserError, match=match) as info:
            parse_mem_target(bad)
        assert "\n" not in str(info.value)


def test_plan_table_and_heatmap(tmp_path):
    r = memory_report(WindowPolicy(1), SMALL)
    text = format_plan_table(r)
    assert "| 1 | compute | 9 | 1 | 4 | 9 | 0 |" in text and "of the full 16-bit cache" in text
    q = format_plan_table(memory_report(WindowPolicy(1, kv_format=("int8", "int4")), SMALL))
    assert "| 0 | int8 | 9 |" in q and "| 1 | int4 | 9 |" in q and "int8 ×1, int4 ×1 layers" in q
    png = plot_budget_heatmap(r.plan, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
