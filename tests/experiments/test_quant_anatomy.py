"""experiments/quant_anatomy.py: its simulated storage is the product's where the product has it, and
the rows it calls "equal memory" are at most the int4 row's bytes."""
from __future__ import annotations

import importlib

import pytest
import torch


def load_script():
    return importlib.import_module("experiments.quant_anatomy")


def test_round_trips_are_the_product_quantizer_for_its_formats():
    from varkv_kernels.quant import dequantize, quantize

    qa = load_script()
    x = torch.randn(2, 4, 9, 32, generator=torch.Generator().manual_seed(0))
    for fmt in ("int8", "int4"):
        assert torch.equal(qa.round_trip(x, fmt), dequantize(quantize(x, fmt), torch.float32))
    assert torch.equal(qa.round_trip(x, None), x)
    err = {fmt: (qa.round_trip(x, fmt) - x).abs().mean() for fmt in ("int4", "int3", "int2")}
    assert err["int4"] < err["int3"] < err["int2"]  # fewer levels, larger error


def test_equal_memory_rows_fit_in_the_int4_rows_bytes():
    from tuner.model.config import model_config

    qa = load_script()
    cfg = model_config("tiny")
    reference = qa.memory_fraction(cfg, "real-int4", "real-int4", 40)  # checked against the planner inside
    for name, k_fmt, v_fmt, tokens, *prefix in qa.ROWS:
        first = prefix[0] if prefix else None
        if "equal memory" in name:
            assert qa.memory_fraction(cfg, k_fmt, v_fmt, tokens, first) <= reference + 1e-12, name
            # one more token would not fit: the row uses the memory it claims
            assert qa.memory_fraction(cfg, k_fmt, v_fmt, tokens + 1, first) > reference, name


@pytest.mark.slow  # 14 generations of 4 images
def test_the_simulation_reproduces_the_real_int4_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    qa = load_script()
    qa.main(["--samples", "4", "--batch-size", "4", "--out", str(tmp_path)])  # exits 1 if it does not
    text = (tmp_path / "anatomy.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| int4 K+V")]
    assert len(rows) == 2 and rows[0].split("|")[4:6] == rows[1].split("|")[4:6]  # same PSNR, same Δ
