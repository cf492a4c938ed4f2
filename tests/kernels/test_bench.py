"""``python -m varkv_kernels.bench --quick``: the whole reporting path on tiny CPU shapes."""
from __future__ import annotations

import csv

import pytest

from varkv_kernels.bench import QUICK, format_traffic, main, scale_shapes, traffic


def _records(path):
    with open(path / "kernels_bench.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run (all formats) shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench-quick")
    assert main(["--quick", "--reps", "1", "--out", str(out)]) == 0
    return out


def test_scale_shapes_and_traffic_model():
    assert scale_shapes((1, 2, 3, 4), 1.0) == [(1, 0, 0), (4, 1, 1), (9, 5, 5), (16, 14, 14)]
    assert scale_shapes((1, 2, 3, 4), 0.25) == [(1, 0, 0), (4, 0, 1), (9, 1, 5), (16, 4, 14)]
    # 2 rows, 3 heads, 4 queries over 10 keys, head_dim 8, fp16: K+V of 10 keys, q and out of 4 rows.
    assert traffic(2, 3, 4, 10, 8, 2) == (2 * 2 * 3 * 8 * (20 + 8), 4 * 2 * 3 * 4 * 10 * 8)
    # The same call as 6 cached tokens + 4 new ones: read + written is traffic's figure.
    read, written = format_traffic(2, 3, 4, 6, 8, 2)
    assert read + written == traffic(2, 3, 4, 10, 8, 2)[0] and written == 2 * 3 * 4 * 8 * 2
    # Quantized cache vectors: int8 = 8 bytes + one fp16 scale, int4 = 4 bytes + scale and zero point.
    new_and_q = 2 * 3 * 3 * 4 * 8 * 2
    assert format_traffic(2, 3, 4, 6, 8, 2, "int8")[0] == 2 * 3 * 2 * 6 * (8 + 2) + new_and_q
    assert format_traffic(2, 3, 4, 6, 8, 2, "int4")[0] == 2 * 3 * 2 * 6 * (4 + 4) + new_and_q


def test_quick_run_writes_table_csv_and_plot(quick_run):
    tmp_path = quick_run
    table = (tmp_path / "kernels_bench.md").read_text()
    assert "- device: CPU" in table
    assert "- command: `python -m varkv_kernels.bench --quick --reps 1 --out" in table
    main_table = table.split("## Cache formats")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| d2 |")]
    assert [r.split(" | ")[2] for r in rows] == ["100", "25"]
    records = _records(tmp_path)
    providers = {r["provider"] for r in records}
    assert {"sdpa_full", "torch"} <= providers
    compute = [r for r in records if r["kv_format"] == "compute"]
    assert len(compute) == len(QUICK["fractions"]) * len(QUICK["patch_nums"]) * len(providers)
    fast = "triton" if "triton" in providers else "torch"
    for fmt in ("int8", "int4"):  # the compressed provider only, every scale and fraction
        quant = [r for r in records if r["kv_format"] == fmt]
        assert {r["provider"] for r in quant} == {fast}
        assert len(quant) == len(QUICK["fractions"]) * len(QUICK["patch_nums"])
    last = next(r for r in records
                if r["fraction"] == "0.25" and r["scale"] == "3" and r["provider"] == "torch")
    assert (last["lq"], last["cache_len"], last["full_len"]) == ("16", "4", "30")
    assert all(float(r["ms"]) > 0 and int(r["read_bytes"]) > 0 for r in records)
    assert (tmp_path / "kernels_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_compares_the_formats_at_equal_kept_tokens(quick_run):
    fmt_table = (quick_run / "kernels_bench.md").read_text().split("## Cache formats at equal kept tokens")[1]
    lines = [line for line in fmt_table.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert {"format", "ms", "ms / compute", "MB read", "read / compute"} <= set(head)
    cells = {(r[head.index("cache %")], r[head.index("format")]): r for r in
             ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(cells) == {(c, f) for c in ("100", "25") for f in ("compute", "int8", "int4")}
    read = {k: float(v[head.index("read / compute")]) for k, v in cells.items()}
    assert read[("100", "compute")] == 1.0
    # fp32 CPU run: 4-byte compute elements, so int8 (64 + 2 bytes per vector) and int4 (32 + 4) read less
    assert read[("100", "int4")] < read[("100", "int8")] < 1.0
    assert read[("25", "int4")] < read[("25", "int8")] < 1.0


def test_formats_flag_selects_the_cache_formats(tmp_path):
    assert main(["--quick", "--reps", "1", "--formats", "compute", "--out", str(tmp_path / "c")]) == 0
    assert {r["kv_format"] for r in _records(tmp_path / "c")} == {"compute"}
    assert "## Cache formats" not in (tmp_path / "c" / "kernels_bench.md").read_text()
    assert main(["--quick", "--reps", "1", "--formats", "int4", "--out", str(tmp_path / "q")]) == 0
    records = _records(tmp_path / "q")
    assert {r["kv_format"] for r in records} == {"int4"} and len(records) == 2 * len(QUICK["patch_nums"])
    assert "| d2 | 1 | 25 | int4 |" in (tmp_path / "q" / "kernels_bench.md").read_text()
    assert not (tmp_path / "q" / "kernels_bench.png").exists()  # no compute cache, no ratio to plot


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--models", "d99"])
    assert exc.value.code == 2
    assert "unknown model(s) d99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--formats", "int8,fp8"])
    assert exc.value.code == 2
    assert "--formats int8,fp8" in capsys.readouterr().err
