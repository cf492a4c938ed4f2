"""The Infinity engine's full-cache generation reproduces the official inference (our independent
reading, tests/model/infinity_official_reading.py) on official-format random checkpoints."""
from __future__ import annotations

import pytest
import torch

from tests.model.infinity_official_reading import VAE_PATCHIFY, official_infer, write_official_checkpoints
from tuner.model.infinity_generate import generate_infinity, lens_from_mask, random_text
from tuner.model.infinity_loading import load_infinity

SIDES = (1, 2, 4)  # a 64² image through the patch-16 VAE: 21 tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_checkpoints(tmp_path_factory.mktemp("infinity"))


@pytest.fixture(scope="module")
def patchify_files(tmp_path_factory):
    return write_official_checkpoints(tmp_path_factory.mktemp("infinity_patchify"), vae=VAE_PATCHIFY, seed=3)


def _compare(files, sides, lens, patchify=False, **sampling):
    model_path, vae_path, sd, vae_sd = files
    loaded = load_infinity(model_path, vae_path, sides=sides)
    text, lens = random_text(len(lens), 256, max(lens), seed=5, lens=lens)
    ours = generate_infinity(loaded.model, loaded.vae, text, lens, seed=11, **sampling)
    s = sampling
    bits, images = official_infer(sd, vae_sd, sides, text, list(lens), 11, s["cfg"], s["tau"], s["top_k"],
                                  s["top_p"], s["cfg_insertion_layer"], patchify)
    assert [t.shape for t in ours.tokens] == [b.shape for b in bits]
    for si, (a, b) in enumerate(zip(ours.tokens, bits)):
        assert torch.equal(a, b), f"scale {si}: {int((a != b).sum())} of {a.numel()} bits differ"
    assert ours.images.shape == images.shape
    assert (ours.images - images).abs().max().item() < 1e-5
    return ours


@pytest.mark.parametrize("sides,lens,cfg,tau,top_k,top_p,layer", [
    (SIDES, (10, 6), 3.0, 1.0, 900, 0.97, 0),       # the official CLI: cfg 3 on the logits, ragged prompts
    ((1, 2, 4, 6), (7, 7), 4.0, 0.7, 1, 0.0, -1),   # guidance on the last block's output, top-k 1 (greedy)
    (SIDES, (5, 3, 9), 1.0, 1.3, 0, 0.6, 0),        # no guidance (one row per prompt), top-p only
])
def test_full_cache_matches_official_reading(files, sides, lens, cfg, tau, top_k, top_p, layer):
    res = _compare(files, sides, lens, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, cfg_insertion_layer=layer)
    assert res.images.shape == (len(lens), 3, 16 * sides[-1], 16 * sides[-1])
    assert 0.0 <= float(res.images.min()) and float(res.images.max()) <= 1.0
    ones = sum(int(t.sum()) for t in res.tokens) / sum(t.numel() for t in res.tokens)
    assert 0.05 < ones < 0.95  # both bit values are sampled: the comparison is not vacuous


def test_spatial_patchify_matches_official_reading(patchify_files):
    """8B layout: each token's 4·z bits are a 2×2 block of z-bit latent cells (pixel shuffle)."""
    res = _compare(patchify_files, (1, 2, 4, 6), (6, 4), patchify=True, cfg=3.0, tau=1.0, top_k=900,
                   top_p=0.97, cfg_insertion_layer=0)
    assert res.images.shape == (2, 3, 96, 96)  # 6 tokens → 12 latent cells → ×8 pixels


def test_result_fields_and_full_cache_bytes(files):
    loaded = load_infinity(files[0], files[1], sides=SIDES)
    text, lens = random_text(2, 256, 8, seed=1)
    res = generate_infinity(loaded.model, loaded.vae, text, lens, seed=0)
    g = loaded.engine.geometry
    assert g.seq_len == 21 and len(res.scale_seconds) == 3 and res.decode_seconds > 0
    assert res.plan.full and res.index_bytes_allocated == 0
    # the official layout: every layer holds all L tokens of K and V, 4 rows (2 prompts × CFG), fp32
    assert res.kv_bytes_allocated == g.seq_len * g.num_layers * 2 * 4 * g.num_heads * g.head_dim * 4


def test_seed_reproducible_and_seed_sensitive(files):
    loaded = load_infinity(files[0], files[1], sides=SIDES)
    text, lens = random_text(2, 256, 8, seed=2)
    a, b, c = (generate_infinity(loaded.model, loaded.vae, text, lens, seed=s) for s in (4, 4, 5))
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not torch.equal(a.images, c.images)


def test_mask_lengths_equal_explicit_lengths(files):
    loaded = load_infinity(files[0], files[1], sides=SIDES)
    text, lens = random_text(2, 256, 8, seed=3, lens=(8, 3))
    mask = torch.arange(8).view(1, -1) < torch.tensor(lens).view(-1, 1)
    assert lens_from_mask(mask) == lens
    padded = text.clone()
    padded[1, 3:] = 7.0  # what lies past a prompt's length is never read
    a = generate_infinity(loaded.model, loaded.vae, text, lens, seed=1)
    b = generate_infinity(loaded.model, loaded.vae, padded, lens_from_mask(mask), seed=1)
    assert torch.equal(a.images, b.images)


def test_every_parameter_matters(files):
    """Perturbing any single transformer tensor changes the sampled bits: the reference comparison is
    not vacuous (no parameter is ignored by both readings)."""
    loaded = load_infinity(files[0], files[1], sides=SIDES)
    text, lens = random_text(2, 256, 8, seed=4, lens=(8, 5))

    def bits():
        res = generate_infinity(loaded.model, loaded.vae, text, lens, seed=0, top_k=0, top_p=0.0)
        return torch.cat([t.flatten() for t in res.tokens])

    base = bits()
    gen = torch.Generator().manual_seed(0)
    for name, p in loaded.model.named_parameters():
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(2.0 * torch.randn(p.shape, generator=gen) + 0.5)
        changed = not torch.equal(bits(), base)
        with torch.no_grad():
            p.copy_(saved)
        assert changed, name
