"""Bad inputs to Infinity generation are one-line UserErrors naming the problem and the fix, raised
before any work (no cache is allocated, nothing is sampled)."""
from __future__ import annotations

import pytest
import torch

from tests.model.infinity_official_reading import write_official_checkpoints
from tuner.errors import UserError
from tuner.model.bsq_vae import BSQVAE
from tuner.model.infinity import InfinityEngineConfig
from tuner.model.infinity_config import BSQVAEConfig, InfinityConfig
from tuner.model.infinity_generate import generate_infinity, random_text
from tuner.model.infinity_loading import load_infinity, random_infinity


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model_path, vae_path, _, _ = write_official_checkpoints(tmp_path_factory.mktemp("infinity_inputs"))
    return load_infinity(model_path, vae_path, sides=(1, 2))


TEXT, LENS = random_text(2, 256, 6, lens=(6, 3))


@pytest.mark.parametrize("text,lens,kw,match", [
    (torch.randn(2, 6, 128), LENS, {}, "width 128, the model reads 256-wide T5 features"),
    (torch.randn(6, 256), LENS, {}, r"must be a float tensor \[batch, tokens, 256\], got \(6, 256\)"),
    ([[0.0]], LENS, {}, "must be a float tensor .* got list"),
    (torch.zeros(2, 6, 256, dtype=torch.long), LENS, {}, "must be a float tensor"),
    (torch.randn(0, 6, 256), (), {}, "hold no prompt"),
    (TEXT, (6,), {}, r"lengths \[6\] do not fit 2 prompts"),
    (TEXT, (6, 7), {}, r"lengths \[6, 7\] do not fit 2 prompts of up to 6 tokens"),
    (TEXT, (6, 0), {}, "between 1 and the padded length"),
    (torch.randn(1, 20, 256), (20,), {}, "20 tokens is longer than the model's 16-token unconditional text"),
    (TEXT, LENS, {"cfg": float("nan")}, "cfg nan must be a finite number"),
    (TEXT, LENS, {"tau": 0.0}, "tau 0.0 must be a positive temperature"),
    (TEXT, LENS, {"top_p": 1.5}, "top_p in"),
    (TEXT, LENS, {"top_k": -1}, "top_k must be >= 0"),
    (TEXT, LENS, {"cfg_insertion_layer": 1}, "cfg_insertion_layer 1 is not valid for 2 blocks"),
    (TEXT, LENS, {"cfg_insertion_layer": -2}, r"use 0 \(guidance on the logits\) or -1"),
])
def test_bad_inputs_are_one_line_user_errors(loaded, text, lens, kw, match):
    with pytest.raises(UserError, match=match) as info:
        generate_infinity(loaded.model, loaded.vae, text, lens, seed=0, **kw)
    assert "\n" not in str(info.value) and "; " in str(info.value)


def test_long_prompts_are_fine_without_guidance(loaded):
    text = torch.randn(1, 20, 256)
    res = generate_infinity(loaded.model, loaded.vae, text, (20,), seed=0, cfg=1.0)
    assert res.images.shape == (1, 3, 32, 32)


def test_text_on_another_device_is_refused(loaded):
    with pytest.raises(UserError, match="text features are on meta, the model on cpu; move them"):
        generate_infinity(loaded.model, loaded.vae, torch.empty(1, 4, 256, device="meta"), (4,))


def test_a_vae_of_other_bits_is_refused(loaded):
    vae_cfg = BSQVAEConfig(codebook_dim=3, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    with pytest.raises(UserError, match="predicts 8 bits per token, the BSQ-VAE decodes 3"):
        generate_infinity(loaded.model, BSQVAE(vae_cfg), TEXT, LENS)
    with pytest.raises(ValueError, match="8 bits per token but the BSQ-VAE has 3-bit codes"):
        random_infinity(loaded.engine, vae_cfg)


def test_engine_config_rejects_what_it_cannot_run():
    arch = InfinityConfig(2, 64, 4, codebook_dim=8, text_channels=256)
    with pytest.raises(ValueError, match="not a prefix of the official schedule"):
        InfinityEngineConfig(arch, sides=(1, 2, 3))
    with pytest.raises(ValueError, match="not a multiple of block_chunks"):
        InfinityEngineConfig(arch, block_chunks=3)
    two = InfinityConfig(2, 64, 4, text_channels=256, h_div_w=2.0)  # non-square ratios run: sides = heights
    with pytest.raises(ValueError, match="not a prefix of the official schedule's heights"):
        InfinityEngineConfig(two, sides=(1, 2, 4, 4))
    with pytest.raises(ValueError, match="has 13 scales, not 14"):
        InfinityEngineConfig.first_scales(two, 14)
