"""Infinity with real (official-format) weights through the product path (issue 19): a
``--weights-dir`` folder laid out as the official ``weights/`` (transformer, BSQ-VAE, ``flan-t5-xl/``),
made by the tests with random weights and a tiny T5. Images equal the modules run on the features of
the official ``encode_prompt``; a sharded transformer loads the same weights; generate, evaluate and
search run on it; a broken folder is one ``error:`` line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers", reason="the 'infinity' extra (transformers) is part of the test extra")

from tests.model.infinity_weights_dir import infinity_test_weights  # noqa: E402
from tests.model.test_text_encoder import official_encode_prompt  # noqa: E402
from tests.test_cli_generate import assert_user_error  # noqa: E402
from tuner.cli.app import build_app  # noqa: E402
from tuner.model.infinity_generate import generate_infinity  # noqa: E402
from tuner.model.infinity_loading import load_infinity  # noqa: E402
from tuner.model.loading import load_model  # noqa: E402
from tuner.model.prompts import DEFAULT_PROMPTS  # noqa: E402

SIDES = (1, 2, 4)  # 64², 21 tokens
runner = CliRunner()


def run(*args):
    return runner.invoke(build_app(), list(map(str, args)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return infinity_test_weights(tmp_path_factory.mktemp("weights"))


def test_images_equal_the_modules_on_the_official_text_features(weights):
    loaded = load_model("infinity-test", weights_dir=weights, sides=SIDES)
    assert loaded.note is None and loaded.checkpoint_sha256 and "flan-t5-xl/" in loaded.source
    got = loaded.generate_chunk([0, 2], seed=5, cfg=3.0, top_k=900, top_p=0.97).images
    ref = load_infinity(weights / "infinity_test.pth", weights / "infinity_vae_test.pth",
                        name="infinity-test", sides=SIDES)
    feats = [official_encode_prompt(weights / "flan-t5-xl", DEFAULT_PROMPTS[i], 32) for i in (0, 2)]
    lens = [f.shape[0] for f in feats]
    text = torch.zeros(2, max(lens), feats[0].shape[1])
    for i, f in enumerate(feats):
        text[i, :lens[i]] = f
    want = generate_infinity(ref.model, ref.vae, text, lens, seed=5, cfg=3.0, top_k=900, top_p=0.97).images
    assert got.shape == (2, 3, 64, 64) and torch.equal(got, want)
    # the text encoder is part of the model's identity in evaluation-cache keys
    assert "|t5:" in loaded.conditions_key


def test_a_sharded_transformer_loads_the_same_weights(weights, tmp_path):
    sharded = infinity_test_weights(tmp_path / "sharded", sharded=True)
    one = load_model("infinity-test", weights_dir=weights, sides=SIDES)
    two = load_model("infinity-test", weights_dir=sharded, sides=SIDES)
    for (k, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(a, b), k
    index = sharded / "infinity_test.pth" / "pytorch_model.bin.index.json"
    (sharded / "infinity_test.pth" / "shard-2.bin").unlink()
    r = run("generate", "--model", "infinity-test", "--weights-dir", sharded, "--out", tmp_path / "o")
    assert_user_error(r, "names shard shard-2.bin, which is not in")
    index.write_text(json.dumps({"weight_map": {"x": "../secret.bin"}}))
    r = run("generate", "--model", "infinity-test", "--weights-dir", sharded, "--out", tmp_path / "o")
    assert_user_error(r, "outside its folder")


def test_generate_evaluate_and_search_on_real_weights(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    common = ("--model", "infinity-test", "--weights-dir", weights, "--sides", "1,2,4", "--device", "cpu")
    r = run("generate", *common, "--prompt", "a red fox", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "note:" not in r.output and "flan-t5-xl/" in r.output
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (1, 3, 64, 64)
    r = run("evaluate", *common, "--policy", "scalekv_10", "--samples", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["samples"] == 4
    from tuner.search.config import resolve_config
    from tuner.search.driver import run_search

    cfg = resolve_config(model="infinity-test", weights_dir=str(weights), sides=SIDES, mem_target="50%",
                         family="budgets", trials=2, samples=2, min_samples=2, final_samples=2, final_top_k=1,
                         workers=0, device="cpu", mlflow_uri="none", out=str(tmp_path / "run"),
                         eval_batch_size=4, proxy_candidates=2, proxy_top=1, presets=False, grids=False)
    result = run_search(cfg, progress=False)
    assert [r for r in result.records if r.evaluated], [r.error for r in result.records]
    policy = json.loads(result.policy_path.read_text())
    assert policy["model"]["checkpoint_sha256"] == load_model("infinity-test", weights_dir=weights,
                                                              sides=SIDES).checkpoint_sha256
    # `tuner policy check` re-evaluates it on the maps it was planned for (1,2,4), not on the model's
    # default 1,2,4,6, which would re-plan the family to another budget table and another memory
    r = run("policy", "check", result.policy_path, "--reference", result.policy_path,
            "--weights-dir", weights, "--metric", "psnr", "--samples", 4)
    assert r.exit_code == 0, r.output
    fraction = f"{100 * policy['memory']['fraction']:.2f}%"
    assert f"{fraction} / {fraction}" in r.output and "ok: 1 policy" in r.output


def test_a_broken_weights_folder_is_one_error_line(weights, tmp_path):
    base = ("--model", "infinity-test", "--sides", "1,2,4", "--device", "cpu")
    r = run("generate", *base, "--out", tmp_path / "o")
    assert_user_error(r, "needs its weights", "infinity_test.pth", "flan-t5-xl/", "--random-weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("generate", *base, "--weights-dir", empty, "--out", tmp_path / "o")
    assert_user_error(r, "infinity_test.pth not found in")
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(weights, no_t5, ignore=shutil.ignore_patterns("flan-t5-xl"))
    for cmd in (("generate", "--out", tmp_path / "o"),
                ("evaluate", "--policy", "scalekv_10", "--samples", "2"),
                ("search", "--mem-target", "50%", "--trials", "1", "--out", tmp_path / "s")):
        r = run(cmd[0], *base, "--weights-dir", no_t5, *cmd[1:])
        assert_user_error(r, "T5 text encoder directory not found")
    assert not (tmp_path / "s").exists()  # nothing left behind
    r = run("generate", *base, "--var-ckpt", weights / "infinity_test.pth", "--vae-ckpt",
            weights / "infinity_vae_test.pth", "--out", tmp_path / "o")
    assert_user_error(r, "reads its files from --weights-dir")
