"""Strict loading of official-format Infinity and BSQ-VAE files: the architecture comes from the tensor
shapes, and every broken file is one UserError line that names the problem and the fix."""
from __future__ import annotations

import pytest
import torch

from tests.model.infinity_official_reading import ARCH, VAE, VAE_PATCHIFY, write_official_checkpoints
from tuner.errors import UserError
from tuner.model.checkpoint import sha256_file
from tuner.model.infinity_config import BSQVAEConfig
from tuner.model.infinity_generate import generate_infinity, random_text
from tuner.model.infinity_loading import load_infinity


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_checkpoints(tmp_path_factory.mktemp("infinity_load"))


def _fails(model_path, vae_path, match: str, **kw) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_infinity(model_path, vae_path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "; " in msg  # one line: the problem, then the fix
    return msg


def test_round_trip_reads_the_architecture_from_the_shapes(files):
    model_path, vae_path, sd, vae_sd = files
    loaded = load_infinity(model_path, vae_path, sides=(1, 2, 4))
    a = loaded.engine.arch
    assert (a.depth, a.embed_dim, a.num_heads, a.head_dim, a.ffn_hidden) == (2, 64, 4, 16, 256)
    assert (a.codebook_dim, a.text_channels, a.text_maxlen) == (8, 256, 16)
    assert loaded.engine.block_chunks == ARCH["chunks"] and loaded.engine.sides == (1, 2, 4)
    assert loaded.config.vae == BSQVAEConfig(codebook_dim=8, patch_size=16, base_ch=32,
                                             ch_mult=VAE["ch_mult"], num_res_blocks=1)
    assert loaded.config.name == "infinity-d2" and loaded.checkpoint_sha256 == sha256_file(model_path)
    got = loaded.model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    dec = loaded.vae.state_dict()
    decoder = {k: v for k, v in vae_sd.items() if k.startswith("decoder.")}  # encoder and masks dropped
    assert set(dec) == set(decoder) and all(torch.equal(dec[k], decoder[k]) for k in decoder)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_patchify_vae_shape_is_inferred(tmp_path):
    model_path, vae_path, _, _ = write_official_checkpoints(tmp_path, vae=VAE_PATCHIFY)
    loaded = load_infinity(model_path, vae_path)
    assert loaded.config.vae.patch_size == 8 and loaded.config.vae.codebook_dim == 2
    assert loaded.engine.schedule[-1] == (64, 64)  # sides default to the whole 1M schedule


def test_flat_vae_names_load_the_same_weights(tmp_path, files):
    """The official ``load_cnn`` accepts ``decoder.conv_in.weight`` as well as the wrappers' names."""
    model_path, vae_path, _, _ = write_official_checkpoints(tmp_path, flat_vae=True)
    assert "decoder.conv_in.weight" in torch.load(vae_path, weights_only=True)["vae"]
    flat, wrapped = load_infinity(model_path, vae_path), load_infinity(files[0], files[1])
    a, b = flat.vae.state_dict(), wrapped.vae.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_buffers_the_official_loader_drops_are_ignored(tmp_path, files):
    sd = dict(files[2], attn_bias_for_masking=torch.zeros(1, 1, 21, 21), lvl_1L=torch.zeros(1, 21))
    torch.save(sd, tmp_path / "m.pth")
    loaded = load_infinity(tmp_path / "m.pth", files[1], sides=(1, 2, 4))
    text, lens = random_text(1, 256, 4)
    assert generate_infinity(loaded.model, loaded.vae, text, lens, seed=0).images.shape == (1, 3, 64, 64)


def _saved(tmp_path, sd, name="bad.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_missing_unexpected_and_mis_shaped_keys(tmp_path, files):
    model_path, vae_path, sd, vae_sd = files
    key = "block_chunks.1.module.0.ca.v_bias"
    missing = _saved(tmp_path, {k: v for k, v in sd.items() if k != key})
    assert key in _fails(missing, vae_path, "missing keys")
    extra = _saved(tmp_path, dict(sd, **{"block_chunks.0.module.0.ca.extra": torch.zeros(3)}))
    assert "block_chunks.0.module.0.ca.extra" in _fails(extra, vae_path, "unexpected keys")
    shaped = _saved(tmp_path, dict(sd, **{"text_norm.weight": torch.ones(255)}))
    assert "text_norm.weight (255,) != (256,)" in _fails(shaped, vae_path, "mis-shaped")
    for msg in (_fails(missing, vae_path, "missing"), _fails(shaped, vae_path, "mis-shaped")):
        assert "pass an unmodified official-format checkpoint" in msg
    vkey = "decoder.up.0.block.1.conv2.conv.bias"
    bad_vae = _saved(tmp_path, {"vae": {k: v for k, v in vae_sd.items() if k != vkey}}, "v.pth")
    assert vkey in _fails(model_path, bad_vae, "BSQ-VAE checkpoint .* missing keys")


def test_file_level_errors(tmp_path, files):
    model_path, vae_path, sd, vae_sd = files
    _fails(tmp_path / "nope.pth", vae_path, "Infinity checkpoint not found")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _fails(tmp_path / "junk.pth", vae_path, "not a readable PyTorch checkpoint")
    _fails(vae_path, model_path, "is not an Infinity transformer checkpoint .*swap the two files")
    _fails(model_path, model_path, "holds an Infinity transformer, not a BSQ-VAE; swap")
    _fails(model_path, vae_path, "depth-2 width-64 model, not infinity-2b", name="infinity-2b")
    _fails(model_path, vae_path, "not a prefix of the official schedule", sides=(1, 2, 3))
    other = write_official_checkpoints(tmp_path, vae={**VAE, "z": 6})[1]
    _fails(model_path, other, "do not belong together: .*8 bits per token .* 6-bit codes")
    unchunked = _saved(tmp_path, {k.replace("block_chunks.0.module.0", "blocks.0"): v for k, v in sd.items()
                                  if not k.startswith("block_chunks.1")})
    _fails(unchunked, vae_path, "no block_chunks")
