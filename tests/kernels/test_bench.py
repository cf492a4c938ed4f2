"""``python -m kernels.bench --quick``: the whole reporting path on tiny CPU shapes."""
from __future__ import annotations

import csv

import pytest

from kernels.bench import QUICK, main, scale_shapes, traffic


def test_scale_shapes_and_traffic_model():
    assert scale_shapes((1, 2, 3, 4), 1.0) == [(1, 0, 0), (4, 1, 1), (9, 5, 5), (16, 14, 14)]
    assert scale_shapes((1, 2, 3, 4), 0.25) == [(1, 0, 0), (4, 0, 1), (9, 1, 5), (16, 4, 14)]
    # 2 rows, 3 heads, 4 queries over 10 keys, head_dim 8, fp16: K+V of 10 keys, q and out of 4 rows.
    assert traffic(2, 3, 4, 10, 8, 2) == (2 * 2 * 3 * 8 * (20 + 8), 4 * 2 * 3 * 4 * 10 * 8)


def test_quick_run_writes_table_csv_and_plot(tmp_path, capsys):
    assert main(["--quick", "--reps", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "kernels_bench.md").read_text()
    assert "- device: CPU" in table and "- command: `python -m kernels.bench --quick --reps 1 --out" in table
    rows = [line for line in table.splitlines() if line.startswith("| d2 |")]
    assert [r.split(" | ")[2] for r in rows] == ["100", "25"]
    with open(tmp_path / "kernels_bench.csv") as fh:
        records = list(csv.DictReader(fh))
    providers = {r["provider"] for r in records}
    assert {"sdpa_full", "torch"} <= providers
    assert len(records) == len(QUICK["fractions"]) * len(QUICK["patch_nums"]) * len(providers)
    last = next(r for r in records
                if r["fraction"] == "0.25" and r["scale"] == "3" and r["provider"] == "torch")
    assert (last["lq"], last["cache_len"], last["full_len"]) == ("16", "4", "30")
    assert all(float(r["ms"]) > 0 for r in records)
    assert (tmp_path / "kernels_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--models", "d99"])
    assert exc.value.code == 2
    assert "unknown model(s) d99" in capsys.readouterr().err
