"""The product path: ``tuner search`` with the real evaluator on the shipped ``tiny`` model (slow)."""
from __future__ import annotations

import json

import pytest

from tuner.search.config import resolve_config
from tuner.search.driver import run_search

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "ray-actor"])
def test_search_with_the_real_evaluator_on_tiny(tmp_path, workers):
    if workers:
        import os

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = resolve_config(model="tiny", mem_target="50%", family="all", trials=4, samples=2, final_samples=2,
                         final_top_k=1, workers=workers, device="cpu",
                         mlflow_uri=f"sqlite:///{tmp_path / 'ml.db'}",
                         out=str(tmp_path / "run"), eval_batch_size=8,
                         proxy_candidates=0)  # the proxy has its own tests below
    result = run_search(cfg, progress=False)
    evaluated = [r for r in result.records if r.evaluated]
    assert evaluated, [r.error for r in result.records]
    for r in evaluated:
        m = r.metrics
        assert 0 < m["memory_fraction"] <= 0.5
        assert {"fid_vs_full", "psnr", "ssim", "kv_bytes_per_image", "latency_s_per_image"} <= set(m)
    assert result.policy_path is not None and result.policy_path.is_file()
    data = json.loads(result.policy_path.read_text())
    assert data["schema_version"] >= 1
    names = [row["policy"] for row in result.comparison]
    assert names[0] == "full cache" and names[-1].startswith("winner")
    full = result.comparison[0]
    assert full["memory_fraction"] == pytest.approx(1.0)
    from tuner.model.config import model_config
    from tuner.policy_file import load_policy_file

    policy, _ = load_policy_file(result.policy_path, model_config("tiny"))
    assert policy.family == result.comparison[-1]["family"]


def test_proxy_prescreen_enqueues_the_best_scored_policies_once(tmp_path):
    """The real evaluator scores random fitted policies by the zero-generation proxy (no image generated
    for them), the best ones become the first trials after the presets, and a resume does not redo it."""
    import optuna

    from tuner.search.prescreen import A_PRESCREENED, A_PROXY_SCORE

    kw = dict(model="tiny", mem_target="15%", family="all", samples=2, final_samples=2, final_top_k=1,
              workers=0, device="cpu", mlflow_uri="none", out=str(tmp_path / "run"), eval_batch_size=8,
              presets=False, proxy_candidates=12, proxy_top=3)
    result = run_search(resolve_config(trials=3, **kw), progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    assert study.user_attrs[A_PRESCREENED] is True
    scored = [t for t in study.trials if A_PROXY_SCORE in t.user_attrs]
    assert [t.number for t in scored] == [0, 1, 2]  # the first trials, best score first
    scores = [t.user_attrs[A_PROXY_SCORE] for t in scored]
    assert scores == sorted(scores) and all(0 < s < 1 for s in scores)
    assert all(t.user_attrs["metrics"]["memory_fraction"] <= 0.15 for t in scored)  # fitted to the target
    run_search(resolve_config(trials=5, **kw), progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    assert len([t for t in study.trials if A_PROXY_SCORE in t.user_attrs]) == 3  # not enqueued again


def test_warm_starts_run_best_proxy_score_first_presets_included(tmp_path):
    """The presets and the proxy's best random policies form one queue ordered by proxy score: the
    search's first trial is the best-scored policy (at 15% on tiny an int4 preset, not a 16-bit one),
    every preset the space can express is enqueued exactly once, and a resume enqueues nothing again."""
    import optuna

    from tuner.search.prescreen import A_PROXY_SCORE
    from tuner.search.trials import A_PRESET

    kw = dict(model="tiny", mem_target="15%", family="all", samples=2, min_samples=2, final_samples=2,
              final_top_k=1, workers=0, device="cpu", mlflow_uri="none", out=str(tmp_path / "run"),
              eval_batch_size=8, proxy_candidates=6, proxy_top=2, grids=False)
    result = run_search(resolve_config(trials=2, **kw), progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    queued = sorted((t for t in study.trials if A_PROXY_SCORE in t.user_attrs), key=lambda t: t.number)
    scores = [t.user_attrs[A_PROXY_SCORE] for t in queued]
    assert scores == sorted(scores) and queued[0].number == 0
    presets = [t.user_attrs[A_PRESET] for t in study.trials if A_PRESET in t.user_attrs]
    assert len(presets) == len(set(presets)) > 6 and {"ams", "ams + int8", "ams + int4"} <= set(presets)
    assert len([t for t in queued if A_PRESET not in t.user_attrs]) == 2  # the proxy's best random ones
    first = queued[0].user_attrs
    assert "int4" in str(first.get("fixed_policy")) or "int8" in str(first.get("fixed_policy")), first
    n = len(study.trials)
    run_search(resolve_config(trials=3, **kw), progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    again = [t.user_attrs[A_PRESET] for t in study.trials if A_PRESET in t.user_attrs]
    assert sorted(again) == sorted(presets) and len(study.trials) >= n
