"""The T5 text encoder from a local folder: the features the official ``encode_prompt`` computes,
cached per prompt, and one-line errors for every broken folder (tiny T5 folders made by the tests)."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the 'infinity' extra (transformers) is part of the test extra")

from tests.model.infinity_weights_dir import tiny_t5  # noqa: E402
from tuner.errors import UserError  # noqa: E402
from tuner.model.text_encoder import encoder_fingerprint, load_text_encoder  # noqa: E402

PROMPTS = ["a red fox sitting in fresh snow, morning light", "a cat", "an old lighthouse on a rocky coast"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5") / "flan-t5-xl", d_model=64)


def official_encode_prompt(directory, prompt: str, max_length: int) -> torch.Tensor:
    """A reading of the official ``tools/run_infinity.py`` (``load_tokenizer`` + ``encode_prompt``):
    one prompt, padded to ``max_length``, ``last_hidden_state`` in float32 cut to the mask's length."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(directory), revision=None, legacy=True)
    encoder = T5EncoderModel.from_pretrained(str(directory)).eval()
    tokens = tokenizer(text=[prompt], max_length=max_length, padding="max_length", truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        feats = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)["last_hidden_state"]
    n = int(tokens.attention_mask.sum(dim=-1)[0])
    return feats.float()[0, :n]


def test_features_equal_the_official_encode_prompt_and_ignore_batch_neighbours(t5_dir):
    enc = load_text_encoder(t5_dir, max_length=24, text_channels=64)
    feats, lens = enc.encode(PROMPTS)
    assert feats.shape == (3, max(lens), 64) and feats.dtype == torch.float32
    for i, prompt in enumerate(PROMPTS):
        want = official_encode_prompt(t5_dir, prompt, 24)
        assert lens[i] == want.shape[0]
        assert torch.equal(feats[i, :lens[i]], want)
        assert not feats[i, lens[i]:].any()  # zeros after each prompt's own tokens
    alone, _ = enc.encode([PROMPTS[1]])
    assert torch.equal(alone[0], feats[1, :lens[1]])


def test_long_prompts_are_truncated_to_the_model_text_length(t5_dir):
    enc = load_text_encoder(t5_dir, max_length=8, text_channels=64)
    _, lens = enc.encode(["a red fox sitting in fresh snow, morning light, in a storm on a rocky coast"])
    assert lens == (8,)


def test_fingerprint_changes_with_the_weights(t5_dir, tmp_path):
    other = tiny_t5(tmp_path / "other", d_model=64, seed=1)
    assert encoder_fingerprint(t5_dir) == encoder_fingerprint(t5_dir)
    assert encoder_fingerprint(other) != encoder_fingerprint(t5_dir)


def _fails(directory, match, **kw):
    kw = {"max_length": 16, "text_channels": 64, **kw}
    with pytest.raises(UserError, match=match) as info:
        load_text_encoder(directory, **kw)
    assert "\n" not in str(info.value) and "; " in str(info.value)


def test_broken_folders_are_one_line_errors(t5_dir, tmp_path):
    _fails(tmp_path / "missing", "not found")
    bad = tmp_path / "bad"
    shutil.copytree(t5_dir, bad)
    _fails(bad, "64-wide features but the Infinity model reads 2048", text_channels=2048)
    from safetensors.torch import load_file, save_file

    weights = bad / "model.safetensors"
    full = load_file(str(weights))
    dropped = sorted(full)[3]
    save_file({k: v for k, v in full.items() if k != dropped}, str(weights), metadata={"format": "pt"})
    _fails(bad, f"lacks or mis-shapes 1 tensor.*first: {dropped}")  # not random weights, silently
    save_file(full, str(weights), metadata={"format": "pt"})
    (bad / "tokenizer.json").unlink()
    _fails(bad, "no tokenizer")
    shutil.copy(t5_dir / "tokenizer.json", bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    _fails(bad, "no weights")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _fails(bad, "'bert' model, not T5")
    (bad / "config.json").write_text("{not json")
    _fails(bad, "not a readable JSON")
    (bad / "config.json").unlink()
    _fails(bad, "no config.json")


def test_without_transformers_the_error_names_the_extra(t5_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    _fails(t5_dir, r"pip install -e '\.\[infinity\]'")
