"""A complete official-layout ``weights/`` folder for ``infinity-test``, made by the tests themselves:
the transformer (one file, or shards with an index), the BSQ-VAE under ``"vae"``, and a tiny T5
encoder folder (``flan-t5-xl/``: config, tokenizer.json, safetensors) written by transformers'
``save_pretrained``, as the hub folder is laid out. Needs transformers (the ``infinity`` extra)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT_WORDS = sorted({w.strip(",.").lower() for line in (
    "a red fox sitting in fresh snow, morning light", "a bowl of ramen with a soft-boiled egg, top view",
    "an old lighthouse on a rocky coast during a storm", "a cat and a dog") for w in line.split()})


def tiny_t5(directory: Path, d_model: int = 128, seed: int = 0) -> Path:
    """A 2-layer T5 v1.1-style encoder (gated GELU) and a Unigram tokenizer, saved as a hub folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -2.0) for w in PROMPT_WORDS]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz-"] + [("▁", -4.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(directory)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    torch.manual_seed(seed)
    T5EncoderModel(cfg).eval().save_pretrained(directory)
    return directory


def infinity_test_weights(directory: Path, *, sharded: bool = False, seed: int = 3) -> Path:
    """``directory`` holding infinity-test's transformer (``infinity_test.pth``, or the
    ``infinity_test.pth/`` folder of two shards when ``sharded``), ``infinity_vae_test.pth`` and
    ``flan-t5-xl/``; random weights of the official format (block names in 2 chunks)."""
    from tuner.model.infinity import InfinityEngineConfig
    from tuner.model.infinity_config import infinity_test
    from tuner.model.infinity_loading import random_infinity

    cfg = infinity_test()
    engine = InfinityEngineConfig(cfg.infinity, sides=cfg.sides, block_chunks=2)
    loaded = random_infinity(engine, cfg.vae, seed)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    if sharded:
        folder = directory / "infinity_test.pth"
        folder.mkdir()
        names = sorted(sd)
        halves = {"shard-1.bin": names[: len(names) // 2], "shard-2.bin": names[len(names) // 2:]}
        for file, keys in halves.items():
            torch.save({k: sd[k] for k in keys}, folder / file)
        weight_map = {k: f for f, keys in halves.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(sd, directory / "infinity_test.pth")
    torch.save({"vae": loaded.vae.state_dict()}, directory / "infinity_vae_test.pth")
    tiny_t5(directory / "flan-t5-xl", d_model=cfg.infinity.text_channels)
    return directory
