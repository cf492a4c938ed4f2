"""experiments/gpu/run.sh --dry-run: the GPU check's code paths on the CPU, so the script works when a GPU
comes.

The dry run is the real driver (subprocess, Triton interpreter, toy sizes, optuna/ray/mlflow/sqlalchemy
blocked); these tests read the tables it writes, prove that a planned/allocated mismatch makes it exit 1
(through its documented test-only flag) and that without a GPU it refuses to pretend to be a GPU run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "experiments" / "gpu" / "run.sh"
OUTPUTS = ("summary.md", "kernels.md", "e2e.md", "maxbatch.md", "results.json", "raw.tar.gz")


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table_rows(md: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell is ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell]


def header_cells(md: str, first_cell: str) -> list[str]:
    return table_rows(md, first_cell)[0]


def tables(md: str) -> list[str]:
    """The markdown tables of ``md``, each as its own text (a table ends at the first non-table line)."""
    out, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    proc = run([str(RUN_SH), "--dry-run", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc


@pytest.mark.timeout(300)
def test_dry_run_writes_every_table_marked_dry_run(dry_run):
    out, proc = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # <= 8 files: what a device call returns
    for name in OUTPUTS[:4]:
        text = (out / name).read_text()
        assert "**DRY RUN**" in text, name
        assert "- device: CPU" in text and "torch " in text and "triton " in text and "Python " in text, name
    assert "pip install skipped" in proc.stdout and "GPU check finished" in proc.stdout


@pytest.mark.timeout(300)
def test_every_step_ran_and_nothing_mismatched(dry_run):
    out, _ = dry_run
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True and res["mismatches"] == []
    statuses = {s["name"]: s["status"] for s in res["steps"]}
    assert statuses.pop("install") == "skipped"
    assert set(statuses) == {"env", "imports", "pytest", "e2e", "kernels:quick-bf16", "kernels:quick-fp16"}
    assert set(statuses.values()) == {"ok"}
    pytest_step = next(s for s in res["steps"] if s["name"] == "pytest")
    assert (pytest_step["details"]["tests"] > 0
            and pytest_step["details"]["skipped"] == pytest_step["details"]["tests"])
    summary = (out / "summary.md").read_text()
    assert "## Mismatches (any one makes the exit status 1)\n\n- none" in summary
    assert {t["what"].split(":")[0] for t in res["targets"]} >= {"end to end", "max batch"}


@pytest.mark.timeout(300)
def test_kernel_table_has_both_dtypes_and_the_targets(dry_run):
    md = tables((dry_run[0] / "kernels.md").read_text())[0]
    head = header_cells(md, "model")
    assert head[:4] == ["model", "dtype", "batch", "cache %"]
    assert {"sdpa_full ms", "torch ms", "triton ms", "triton / sdpa_full", "target"} <= set(head)
    rows = table_rows(md, "d2")
    assert {(r[1], r[3]) for r in rows} == {(d, c) for d in ("bfloat16", "float16") for c in ("100", "25")}
    assert all(r[head.index("target")].startswith("<= 1.1") for r in rows if r[3] == "100")


@pytest.mark.timeout(300)
def test_kernel_format_table_compares_int8_int4_with_the_compute_cache(dry_run):
    found = [t for t in tables((dry_run[0] / "kernels.md").read_text()) if "| format |" in t]
    assert len(found) == 1
    md = found[0]
    head = header_cells(md, "model")
    assert head[:5] == ["model", "dtype", "batch", "cache %", "format"]
    assert {"ms", "ms / compute", "MB read", "read / compute"} <= set(head)
    rows = table_rows(md, "d2")
    assert {(r[1], r[3], r[4]) for r in rows} == {(d, c, f) for d in ("bfloat16", "float16")
                                                  for c in ("100", "25") for f in ("compute", "int8", "int4")}
    assert {r[head.index("provider")] for r in rows} == {"triton"}
    read = {(r[1], r[3], r[4]): float(r[head.index("read / compute")]) for r in rows}
    for dtype in ("bfloat16", "float16"):  # 16-bit cache: 128 B per vector vs 66 (int8) and 36 (int4)
        assert read[(dtype, "100", "compute")] == 1.0
        assert read[(dtype, "100", "int4")] < read[(dtype, "100", "int8")] < 1.0
    res = json.loads((dry_run[0] / "results.json").read_text())
    assert {k["kind"] for k in res["kernels"]} == {"latency", "format"}


@pytest.mark.timeout(300)
def test_e2e_table_compares_the_three_policies_at_equal_batch(dry_run):
    md = (dry_run[0] / "e2e.md").read_text()
    head = header_cells(md, "policy")
    for col in ("images/s", "× full", "KV planned (B)", "KV allocated (B)", "equal", "peak alloc (MiB)",
                "planned peak (MiB)"):
        assert col in head
    rows = {r[0]: r for r in table_rows(md, "full") + table_rows(md, "ams@15%") + table_rows(md, "joint@15%")}
    assert set(rows) == {"full", "ams@15%", "joint@15%"}
    assert {r[head.index("batch")] for r in rows.values()} == {"1"}
    assert all(r[head.index("equal")] == "yes" for r in rows.values())
    assert (rows["full"][head.index("× full")] == "1.00"
            and rows["joint@15%"][head.index("family")] == "budgets")
    assert (float(rows["ams@15%"][head.index("cache %")]) <= 15.0
            and "n/a" in rows["full"][head.index("peak alloc (MiB)")])
    assert "| scale |" in md  # the per-scale latency table


@pytest.mark.timeout(300)
def test_maxbatch_table_measured_matches_planned_on_the_fake_budget(dry_run):
    md = (dry_run[0] / "maxbatch.md").read_text()
    head = header_cells(md, "policy")
    assert {"planned max batch", "measured max batch", "measured / planned", "× full measured"} <= set(head)
    e2e = json.loads((dry_run[0] / "results.json").read_text())["e2e"]
    for p in e2e["policies"]:
        search = p["maxbatch"]["search"]
        assert search["complete"] and search["measured"] == p["maxbatch"]["planned"] > 0, p["name"]
        assert len(search["probes"]) <= 12 and search["probes"][0]["batch"] == p["maxbatch"]["planned"]
    for name in ("full", "ams@15%", "joint@15%"):
        row = table_rows(md, name)[0]
        assert row[head.index("measured / planned")] == "1.00"
    assert float(table_rows(md, "ams@15%")[0][head.index("× full measured")]) > 1.5


@pytest.mark.timeout(300)
def test_a_planned_allocated_mismatch_exits_1(tmp_path):
    proc = run([str(RUN_SH), "--dry-run", str(tmp_path), "--steps", "e2e", "--test-only-plan-offset", "64"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert any("KV bytes allocated" in m and "!= planned" in m for m in res["mismatches"])
    assert any(m.startswith("TEST ONLY") for m in res["mismatches"])
    summary = (tmp_path / "summary.md").read_text()
    assert "Exit status 1" in summary and "!= planned" in summary
    e2e = (tmp_path / "e2e.md").read_text()
    head = header_cells(e2e, "policy")
    assert table_rows(e2e, "full")[0][head.index("equal")] == "NO"


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_real_check_refuses_loudly(tmp_path):
    proc = run([sys.executable, "-m", "experiments.gpu.check", str(tmp_path), "--steps", "e2e"], timeout=120)
    assert proc.returncode == 1
    assert "no CUDA GPU visible" in (tmp_path / "summary.md").read_text()
    assert "DRY RUN" not in (tmp_path / "summary.md").read_text()


def test_bad_arguments_are_usage_errors():
    from experiments.gpu.check import parse_args

    for argv in (["out", "--steps", "kernels,warp"], ["out", "--kernel-runs", "d30:bf16"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
    args = parse_args(["out", "--dry-run", "--steps", "e2e,kernels"])
    assert (args.steps == ["e2e", "kernels"] and args.block_imports
            and [r.model for r in args.runs] == ["quick"] * 2)
    gpu = parse_args(["out"])
    assert not gpu.block_imports and gpu.runs[0].label == "d30-bf16-b16-64" and gpu.budget_s <= 480


def test_kernel_runs_take_cache_formats():
    from experiments.gpu.kernel_table import KV_FORMATS, parse_runs
    from varkv_kernels.quant import KV_FORMATS as QUANT_FORMATS

    assert KV_FORMATS == QUANT_FORMATS
    runs = parse_runs("d30:bf16:16,64;d30:bf16:64:int8,int4;quick:fp16;quick:fp16:int4")
    plain, quant, quick, quick4 = runs
    assert plain.formats == ("compute",) and quant.formats == ("int8", "int4") and quick.formats == KV_FORMATS
    assert [r.label for r in runs] == ["d30-bf16-b16-64", "d30-bf16-b64-int8-int4", "quick-fp16",
                                       "quick-fp16-int4"]
    cmd = quant.command("python", Path("out"))
    assert cmd[cmd.index("--formats") + 1] == "int8,int4" and cmd[cmd.index("--batches") + 1] == "64"
    cmd = plain.command("python", Path("out"))
    assert cmd[cmd.index("--formats") + 1] == "compute"  # the GPU runs' timings stay what they were
    for bad in ("d30:bf16:64:int3", "d30:bf16:64:int8:x", "quick:fp16:", "d30:bf16:x"):
        with pytest.raises(ValueError, match="kernel run"):
            parse_runs(bad)


def test_kernel_summary_counts_a_row_two_runs_measured_once():
    from experiments.gpu.kernel_table import markdown, summarize, target_rows

    def row(provider, fmt, ms, read):
        return dict(model="d30", dtype="bfloat16", batch=64, rows=128, heads=30, head_dim=64, fraction=0.15,
                    scale=9, lq=256, cache_len=64, full_len=680, provider=provider, kv_format=fmt, ms=ms,
                    read_bytes=read, gb_per_s=read / ms / 1e6, tflop_per_s=1.0)

    base = [row("sdpa_full", "compute", 2.0, 400), row("torch", "compute", 3.0, 200),
            row("triton", "compute", 0.5, 200)]
    quant = [row("triton", "int8", 0.4, 110), row("triton", "int4", 0.3, 60)]
    summary = summarize(base + base[2:] + quant)  # the compute triton row also came from a second run
    latency = [s for s in summary if s["kind"] == "latency"]
    assert len(latency) == 1 and latency[0]["ms"]["triton"] == 0.5 and latency[0]["ratio"] == 0.25
    fmts = {s["kv_format"]: s for s in summary if s["kind"] == "format"}
    assert set(fmts) == {"compute", "int8", "int4"}
    assert fmts["int8"]["ms_ratio"] == pytest.approx(0.8) and fmts["int4"]["read_ratio"] == pytest.approx(0.3)
    assert [t["measured"] for t in target_rows(summary, "d30", 64)] == [0.25, None]
    md = markdown(summary)
    assert "| d30 | bfloat16 | 64 | 15 | int4 | triton | 0.3 | 0.600 | 6e-05 | 0.300 |" in md
    only_quant = summarize(quant)  # no compute cache measured: the ratios are "-"
    assert all(s["kind"] == "format" for s in only_quant) and "| 0.4 | - |" in markdown(only_quant)


def test_import_blocker_blocks(tmp_path):
    from experiments.gpu.env import BLOCKED_MODULES, write_blocker

    env = dict(os.environ, PYTHONPATH=str(write_blocker(tmp_path)))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    try:\n        importlib.import_module(n)\n" \
           "    except ImportError:\n        print('blocked', n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *BLOCKED_MODULES], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.split("\n")[:-1] == [f"blocked {n}" for n in BLOCKED_MODULES], proc.stderr


def test_max_batch_search_doubles_bisects_and_respects_its_bounds():
    from experiments.gpu.maxbatch import Probe, search_max_batch

    def probe_for(limit, seconds=1.0, error_at=None):
        def probe(b):
            if error_at is not None and b >= error_at:
                return Probe(b, False, seconds, error="RuntimeError: launch failed")
            return Probe(b, b <= limit, seconds * b / 10)
        return probe

    res = search_max_batch(probe_for(100), 40, max_probes=20, resolution=0.05, probe_limit_s=1e9,
                           time_left=lambda: 1e9)
    assert res.complete and 95 <= res.measured <= 100 and res.upper - res.measured <= 5
    assert [p.batch for p in res.probes[:3]] == [40, 80, 160]
    down = search_max_batch(probe_for(7), 40, max_probes=20, resolution=0.0, probe_limit_s=1e9,
                            time_left=lambda: 1e9)
    assert down.complete and down.measured == 7 and down.probes[0].fits is False
    capped = search_max_batch(probe_for(10_000), 40, max_probes=3, resolution=0.05, probe_limit_s=1e9,
                              time_left=lambda: 1e9)
    assert not capped.complete and capped.measured == 160 and len(capped.probes) == 3
    slow = search_max_batch(probe_for(10_000), 40, max_probes=20, resolution=0.05, probe_limit_s=10,
                            time_left=lambda: 1e9)  # batch 40 takes 4 s, 80 takes 8 s: 160 would take 16 s
    assert not slow.complete and slow.measured == 80 and "predicted" in slow.stop_reason
    broken = search_max_batch(probe_for(10_000, error_at=80), 40, max_probes=20, resolution=0.05,
                              probe_limit_s=1e9, time_left=lambda: 1e9)
    assert not broken.complete and broken.measured == 40 and "launch failed" in broken.stop_reason


def test_joint_policy_transplant_keeps_the_form_and_refuses_shaped_ones():
    from experiments.gpu.policies import DEFAULT_JOINT_FILE, transplant_joint
    from tuner.model.config import model_config
    from tuner.policies.base import CacheGeometry

    g = CacheGeometry.from_var_config(model_config("d30").var)
    params = json.loads(DEFAULT_JOINT_FILE.read_text())["policy"]["params"]
    p = transplant_joint(params, g)
    assert p.family == "budgets" and len(p.scale_curve) == g.num_scales - 1 and p.rule == params["rule"]
    assert p.layer_formats(g) == tuple(f for f in ("int8", "int4", "int4") for _ in range(10))  # 3 groups
    with pytest.raises(ValueError, match="shaped"):
        transplant_joint(dict(params, scale_curve=[0.5, 1.0, 1.0, 1.0, 1.0, 1.0]), g)
    with pytest.raises(ValueError, match="table"):
        transplant_joint(dict(params, table=[[1]], scale_curve=None), g)


def test_probe_attempt_tells_oom_from_a_bug():
    from experiments.gpu.maxbatch import _attempt

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def cublas():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    def bug():
        raise ValueError("grid too large\nsecond line")

    assert _attempt(oom) == (None, None, True)
    assert _attempt(cublas) == (None, None, True)
    assert _attempt(bug) == (None, "ValueError: grid too large", False)
    assert _attempt(lambda: {"kv_bytes_allocated": 1}) == ({"kv_bytes_allocated": 1}, None, False)
