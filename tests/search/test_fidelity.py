"""Multi-fidelity screening: rungs, chunk specs, exact pooling, the pruner in the driver (chunked
intermediate values that survive a resume), and the refusal of a distribution metric at few samples."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from tests.search.helpers import config, counted, eval_log
from tuner.search import trials as T
from tuner.search.driver import run_search
from tuner.search.fidelity import Fidelity, chunk_specs, pool_chunks, rungs_for


def test_rungs_grow_by_the_reduction_factor_up_to_the_samples():
    assert rungs_for(8, 128, 4) == (8, 32, 128)
    assert rungs_for(8, 100, 4) == (8, 32, 100)
    assert rungs_for(8, 8, 4) == (8,) and rungs_for(16, 8, 4) == (8,)
    assert rungs_for(2, 18, 3) == (2, 6, 18)


def test_chunks_partition_the_screening_labels_on_disjoint_seeds():
    common = dict(cfg=1.5, top_k=900, top_p=0.96, batch_size=4)
    whole = T.eval_spec(128, 10, 5, **common)
    chunks = chunk_specs(Fidelity((8, 32, 128)), whole)
    assert [len(c["labels"]) for c in chunks] == [8, 24, 96]
    assert sum((c["labels"] for c in chunks), []) == whole["labels"]
    assert len({c["seed"] for c in chunks}) == 3
    assert {T.eval_key(c) for c in chunks}.isdisjoint({T.eval_key(whole)})
    # a single rung is the single-fidelity spec itself (same cache key as before multi-fidelity)
    assert chunk_specs(Fidelity((128,)), whole) == [whole]


def test_pooled_chunks_equal_one_evaluation_of_all_their_images():
    from tuner.quality.metrics import mean_and_se

    g = torch.Generator().manual_seed(0)
    values = {"psnr": 20 + 3 * torch.randn(50, generator=g, dtype=torch.float64),
              "ssim": torch.rand(50, generator=g, dtype=torch.float64)}
    chunks = []
    for a, b in ((0, 5), (5, 20), (20, 50)):
        c = {"samples": float(b - a), "memory_fraction": 0.15, "kv_bytes_per_image": 100.0,
             "fid_vs_full": 3.0}
        for key, v in values.items():
            c[key], c[f"{key}_se"] = mean_and_se(v[a:b])
        chunks.append(c)
    pooled = pool_chunks(chunks)
    for key, v in values.items():
        mean, se = mean_and_se(v)
        assert pooled[key] == pytest.approx(mean, rel=1e-12)
        assert pooled[f"{key}_se"] == pytest.approx(se, rel=1e-12)
    assert pooled["samples"] == 50 and pooled["memory_fraction"] == 0.15
    assert "fid_vs_full" not in pooled  # a distance between image sets does not pool


def _chunk_sizes(cfg) -> Counter:
    return Counter(e["n"] for e in eval_log(cfg) if e["seed"] != cfg.seed + T.FINAL_SEED_OFFSET)


def test_pruned_search_reports_chunked_intermediate_values_that_a_resume_keeps(tmp_path):
    import optuna

    cfg = config(tmp_path, trials=10, samples=32, min_samples=2, reduction_factor=4, presets=False,
                 mem_target="70%")
    assert cfg.fidelity.rungs == (2, 8, 32)
    result = run_search(cfg, progress=False)
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)
    states = Counter(t.state.name for t in counted(study.trials))
    assert states["PRUNED"] >= 1 and states["COMPLETE"] >= 1
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        if t.state.name == "COMPLETE" and not t.user_attrs.get("plan_infeasible"):
            assert steps == [2, 8, 32] and t.user_attrs["metrics"]["samples"] == 32
        if t.state.name == "PRUNED":
            assert steps in ([2], [2, 8]) and t.user_attrs["metrics"]["samples"] == steps[-1]
    # each chunk is one evaluation: 2, then 6, then 24 images; none of them evaluated twice
    sizes = _chunk_sizes(cfg)
    assert set(sizes) <= {2, 6, 24} and sizes[2] >= sizes[6] >= sizes[24] >= 1
    keys = Counter(json.dumps([e["params"], e["seed"]], sort_keys=True) for e in eval_log(cfg))
    assert max(keys.values()) == 1
    assert result.policy_path is not None
    before = {t.number: dict(t.intermediate_values) for t in study.trials}
    again = config(tmp_path, trials=14, samples=32, min_samples=2, reduction_factor=4, presets=False,
                   mem_target="70%")
    run_search(again, progress=False)
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)
    after = {t.number: dict(t.intermediate_values) for t in study.trials}
    assert all(after[n] == v for n, v in before.items())  # the resume kept every reported value
    assert len(counted(study.trials)) == 14
    keys = Counter(json.dumps([e["params"], e["seed"]], sort_keys=True) for e in eval_log(cfg))
    assert max(keys.values()) == 1  # nothing re-evaluated across the two runs


def test_a_distribution_metric_at_few_samples_is_refused(tmp_path):
    from tuner.cli.app import build_app

    app = build_app()

    runner = CliRunner()
    res = runner.invoke(app, ["search", "--mem-target", "15%", "--metric", "fid_vs_full", "--samples", "8",
                              "--out", str(tmp_path / "o")])
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output
    assert "--metric fid_vs_full --samples 8" in lines[0] and "256" in lines[0]
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, ["search", "--fid-limit", "2", "--final-samples", "32",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--final-samples 32" in res.output and "256" in res.output
    # a paired metric is measured per image, with a standard error, at any sample count
    from tuner.search.config import resolve_config

    cfg = resolve_config(mem_target="15%", metric="psnr", samples=8, out=str(tmp_path / "p"))
    assert cfg.fidelity.rungs == (8,)
    assert resolve_config(fid_limit=2.0, out=str(tmp_path / "q")).samples == 256
    # under a quality limit the objective is memory: no pruning on quality, whatever the metric
    limited = resolve_config(fid_limit=30.0, metric="psnr", out=str(tmp_path / "r"))
    assert limited.fidelity.rungs == (limited.samples,) and not limited.fidelity.pruning
    assert resolve_config(mem_target="15%", out=str(tmp_path / "s")).fidelity.rungs == (8, 32, 128)
