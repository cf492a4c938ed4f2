"""Multi-scale VQ-VAE: official state-dict layout, Phi selection, coding loops, training helpers.

Reference numbers marked "official" were produced by the official VAR modules (commit 78b95394,
``models/vqvae.py``, ``basic_vae.py``, ``quant.py``) built with the same weights as :func:`_fill_`.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from tuner.model.config import PATCH_NUMS_256, PATCH_NUMS_512, VAEConfig, tiny_config
from tuner.model.quantizer import MultiScaleQuantizer, phi_tick_index
from tuner.model.vqvae import VQVAE

SMALL = VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, share_quant_resi=4,
                  using_sa=True, using_mid_sa=True)
SMALL_PNS = (1, 2, 3, 4)


def _fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic non-trivial weights (every parameter matters), drawn in state-dict order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if name.endswith("ema_vocab_hit_SV"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("embedding.weight"):
                p.copy_(noise)
            elif p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.05 * noise)
    return module


@pytest.fixture(scope="module")
def small_vae() -> VQVAE:
    return _fill_(VQVAE(SMALL, SMALL_PNS), 0).eval()


@pytest.fixture(scope="module")
def official_meta() -> VQVAE:
    with torch.device("meta"):
        return VQVAE(VAEConfig(), PATCH_NUMS_256)


def _image(b: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- state dict layout
def test_official_state_dict_keys_order_and_shapes(official_meta):
    sd = official_meta.state_dict()
    assert len(sd) == 324
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    # sha256 of the same listing of the official VQVAE(4096, 32, ch=160, share_quant_resi=4) on meta.
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "d5627eff72c150513563c7d198643cef8b45b2cbeeeb7684593e97ee60730e1c"
    assert sum(p.numel() for p in official_meta.parameters()) == 108_948_355
    expected = {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.4.attn.0.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (640, 640, 1, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.mid.attn_1.qkv.weight": (1920, 640, 1, 1),
        "encoder.norm_out.weight": (640,),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
        "decoder.up.4.attn.2.qkv.bias": (1920,),
        "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (160, 160, 3, 3),
        "decoder.norm_out.bias": (160,),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.embedding.weight": (4096, 32),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.quant_resi.qresi_ls.0.bias": (32,),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.bias": (32,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    for absent in ("encoder.down.0.block.0.nin_shortcut.weight", "encoder.down.4.downsample.conv.weight",
                   "decoder.up.0.upsample.conv.weight", "decoder.up.3.attn.0.qkv.weight",
                   "quantize.quant_resi.qresi_ls.4.weight"):
        assert absent not in sd
    assert [k for k, v in official_meta.named_buffers()] == ["quantize.ema_vocab_hit_SV",
                                                             "quantize.hits_since_reset"]


@pytest.mark.parametrize("share, keys", [
    (1, ["quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"]),
    (0, [f"quantize.quant_resi.{i}.{w}" for i in range(4) for w in ("weight", "bias")]),
    (3, [f"quantize.quant_resi.qresi_ls.{i}.{w}" for i in range(3) for w in ("weight", "bias")]),
])
def test_phi_key_names_per_sharing_mode(share, keys):
    cfg = VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                    share_quant_resi=share)
    with torch.device("meta"):
        sd = VQVAE(cfg, SMALL_PNS).state_dict()
    assert [k for k in sd if k.startswith("quantize.quant_resi.")] == keys


def test_zero_quant_resi_has_no_phi_parameters():
    cfg = VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, quant_resi=0.0)
    q = VQVAE(cfg, SMALL_PNS).quantize
    assert not [k for k in q.state_dict() if "quant_resi" in k]
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(q.phi(1, 4)(x), x)


def test_tiny_config_layout_and_resolution():
    cfg = tiny_config()
    vae = VQVAE(cfg.vae, cfg.var.patch_nums)
    sd = vae.state_dict()
    assert tuple(sd["quantize.ema_vocab_hit_SV"].shape) == (7, 512)
    assert tuple(sd["quantize.embedding.weight"].shape) == (512, 16)
    assert not any(".attn.0." in k for k in sd)  # using_sa=False: no level attention
    assert "encoder.mid.attn_1.qkv.weight" in sd and "encoder.down.1.downsample.conv.weight" in sd
    assert vae.resolution == 32
    with torch.no_grad():
        f = vae.encode_features(_image(2, 32))
        assert tuple(f.shape) == (2, 16, 8, 8)
        assert tuple(vae.fhat_to_img(f).shape) == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- Phi selection
def test_phi_table_matches_official_float64_ties():
    assert [phi_tick_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    with torch.device("meta"):
        for pns in (PATCH_NUMS_256, PATCH_NUMS_512):
            q = MultiScaleQuantizer(8, 4, pns)
            assert [q.phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_tick_index(si, 7, 4) for si in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    # K != 4 uses the half-step ticks linspace(1/2K, 1-1/2K, K).
    assert [phi_tick_index(si, 4, 3) for si in range(4)] == [0, 0, 1, 2]  # si=1: float64 tie
    with torch.device("meta"):
        q = MultiScaleQuantizer(8, 4, PATCH_NUMS_256, share_quant_resi=0)
    assert [q.phi_index(si, 10) for si in range(10)] == list(range(10))
    q = MultiScaleQuantizer(8, 4, (1, 2, 3), share_quant_resi=1)
    assert [q.phi_index(si, 3) for si in range(3)] == [0, 0, 0]


def test_phi_is_half_identity_half_conv():
    q = MultiScaleQuantizer(8, 4, SMALL_PNS)
    _fill_(q, 3)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    conv = q.quant_resi.qresi_ls[2]
    ref = 0.5 * x + 0.5 * F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(q.phi(2, 4)(x), ref, atol=1e-6)
    assert q.phi(2, 4) is conv


# ----------------------------------------------------------------------------- coding loops
def test_matches_official_reference_numbers(small_vae):
    img = _image(2, 8)
    with torch.no_grad():
        idx = small_vae.img_to_idxBl(img)
        rec = small_vae.idxBl_to_img(idx)
        vin = small_vae.quantize.idxBl_to_var_input(idx)
    # official: VQVAE(...).img_to_idxBl / idxBl_to_img(same_shape=True, last_one=True) / idxBl_to_var_input
    assert [i.tolist() for i in idx] == [
        [[7], [14]], [[14, 57, 28, 24], [54, 8, 33, 8]],
        [[57, 57, 14, 33, 61, 14, 24, 8, 8], [14, 52, 42, 14, 14, 42, 14, 24, 24]],
        [[33, 62, 33, 33, 33, 7, 14, 57, 24, 7, 33, 12, 8, 24, 8, 14],
         [42, 31, 14, 14, 36, 34, 34, 24, 33, 17, 7, 49, 8, 7, 36, 33]]]
    assert rec.double().sum().item() == pytest.approx(73.335216, abs=1e-3)
    assert rec.double().abs().sum().item() == pytest.approx(176.031274, abs=1e-3)
    assert tuple(vin.shape) == (2, 29, 8)
    assert vin.double().sum().item() == pytest.approx(-55.964583, abs=1e-3)
    assert vin.double().abs().sum().item() == pytest.approx(168.583150, abs=1e-3)


def test_round_trip_consistent_with_fhat(small_vae):
    img = _image(3, 8, seed=4)
    with torch.no_grad():
        idx = small_vae.img_to_idxBl(img)
        assert [tuple(i.shape) for i in idx] == [(3, p * p) for p in SMALL_PNS]
        assert all(i.dtype == torch.int64 for i in idx)
        f_hats = small_vae.quantize.f_to_fhat(small_vae.encode_features(img))
        from_idx = small_vae.idxBl_to_img(idx)
        assert torch.allclose(from_idx, small_vae.fhat_to_img(f_hats[-1]), atol=1e-5)
        assert torch.allclose(from_idx, small_vae.img_to_reconstructed_img(img), atol=1e-5)
        per_scale = small_vae.idxBl_to_img(idx, last_one=False)
        assert len(per_scale) == 4 and torch.allclose(per_scale[-1], from_idx, atol=1e-6)
        assert torch.allclose(per_scale[1], small_vae.fhat_to_img(f_hats[1]), atol=1e-5)
        assert from_idx.abs().max() <= 1.0


def _hand_loop(q: MultiScaleQuantizer, idx_Bl, pns):
    """The official next-input recursion written out with explicit ops and the hard-coded table."""
    b, z, hw = idx_Bl[0].shape[0], q.z_channels, pns[-1]
    f_hat = torch.zeros(b, z, hw, hw)
    nexts = []
    for si, pn in enumerate(pns):
        h = q.embedding.weight[idx_Bl[si]].permute(0, 2, 1).reshape(b, z, pn, pn)
        conv = q.quant_resi.qresi_ls[[0, 1, 2, 3][phi_tick_index(si, len(pns), 4)]]
        if si < len(pns) - 1:
            h = F.interpolate(h, size=(hw, hw), mode="bicubic", align_corners=False)
        f_hat = f_hat + 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        nxt = F.adaptive_avg_pool2d(f_hat, pns[si + 1]) if si < len(pns) - 1 else f_hat
        nexts.append(nxt)
    return f_hat, nexts


def test_next_autoregressive_input_against_hand_loop(small_vae):
    q = small_vae.quantize
    g = torch.Generator().manual_seed(7)
    idx = [torch.randint(64, (2, p * p), generator=g) for p in SMALL_PNS]
    ref_fhat, ref_next = _hand_loop(q, idx, SMALL_PNS)
    with torch.no_grad():
        f_hat = torch.zeros(2, 8, 4, 4)
        outs = []
        for si, pn in enumerate(SMALL_PNS):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(2, 8, pn, pn)
            ret, nxt = q.get_next_autoregressive_input(si, 4, f_hat, h)
            assert ret is f_hat  # updated in place, like the official
            outs.append(nxt.clone())
        assert outs[-1].shape == f_hat.shape and torch.equal(outs[-1], f_hat)
        for mine, ref, pn in zip(outs[:-1], ref_next[:-1], SMALL_PNS[1:]):
            assert tuple(mine.shape) == (2, 8, pn, pn)
            assert torch.allclose(mine, ref, atol=1e-5)
        assert torch.allclose(f_hat, ref_fhat, atol=1e-5)
        assert torch.allclose(q.embed_to_fhat(q.idxBl_to_h(idx), last_one=True), f_hat, atol=1e-6)
        # Teacher forcing input = the same next-scale maps, flattened row-major and concatenated.
        tf = q.idxBl_to_var_input(idx)
        flat = torch.cat([n.flatten(2).transpose(1, 2) for n in outs[:-1]], dim=1)
        assert tuple(tf.shape) == (2, sum(p * p for p in SMALL_PNS) - 1, 8)
        assert torch.allclose(tf, flat, atol=1e-6)


# ----------------------------------------------------------------------------- training helpers
def test_training_forward_loss_ste_and_usage():
    vae = _fill_(VQVAE(SMALL, SMALL_PNS), 1).train()
    img = _image(2, 8, seed=2)
    f = vae.encode_features(img)
    with torch.no_grad():
        f_hats = vae.quantize.f_to_fhat(f)
        idx = vae.quantize.f_to_idxBl(f)
    f_st, loss, usage = vae.quantize(f)
    ref = sum(1.25 * F.mse_loss(fh, f.detach()) for fh in f_hats) / 4
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(f_st, f_hats[-1], atol=1e-5)
    assert usage == pytest.approx(len(torch.cat([i.flatten() for i in idx]).unique()) / 64)
    # Straight-through: d f_st / d f is the identity.
    (g_f,) = torch.autograd.grad(f_st.sum(), f, retain_graph=True)
    assert torch.allclose(g_f, torch.ones_like(f))
    rec, vq_loss, usage2 = vae(img)
    assert tuple(rec.shape) == (2, 3, 8, 8) and usage2 == usage
    (rec.square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.3.weight", "decoder.conv_out.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert vae.quantize.hits_since_reset.sum().item() == 2 * 2 * sum(p * p for p in SMALL_PNS)


def test_reset_dead_codes():
    q = MultiScaleQuantizer(16, 4, (1, 2), share_quant_resi=1)
    _fill_(q, 5)
    before = q.embedding.weight.detach().clone()
    used = torch.zeros(16, dtype=torch.bool)
    used[::2] = True
    feats = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) + 10
    n = q.reset_dead_codes(feats, used, generator=torch.Generator().manual_seed(1))
    after = q.embedding.weight.detach()
    assert n == 8
    assert torch.equal(after[::2], before[::2])
    dead_rows = after[1::2]
    match = (dead_rows[:, None, :] == feats[None]).all(-1)  # [8, 50]
    assert match.any(1).all() and match.any(0).sum() == 8  # distinct feature rows
    # Default mask: rows hit by training forwards since the last reset; the counter restarts.
    q.train()
    f = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    q(f)
    hit = q.hits_since_reset > 0
    kept = q.embedding.weight.detach()[hit].clone()
    n2 = q.reset_dead_codes(q.lookup_inputs(f))
    assert n2 == int((~hit).sum()) and n2 > 0
    assert torch.equal(q.embedding.weight.detach()[hit], kept)
    assert q.hits_since_reset.sum() == 0
    assert q.lookup_inputs(f).shape == (3 * (1 + 4), 4)
    assert q.reset_dead_codes(feats, torch.ones(16, dtype=torch.bool)) == 0


def test_load_state_dict_tolerates_other_scale_count(small_vae):
    sd = {k: v.clone() for k, v in small_vae.state_dict().items()}
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(7, 64)
    other = VQVAE(SMALL, SMALL_PNS)
    other.quantize.ema_vocab_hit_SV.fill_(3.0)
    other.load_state_dict(sd)
    assert tuple(sd["quantize.ema_vocab_hit_SV"].shape) == (7, 64)  # caller's dict untouched
    assert torch.equal(other.quantize.ema_vocab_hit_SV, torch.full((4, 64), 3.0))
    assert torch.equal(other.decoder.conv_out.weight, small_vae.decoder.conv_out.weight)
    sd["quantize.embedding.weight"] = torch.zeros(65, 8)
    with pytest.raises(RuntimeError, match="embedding.weight"):
        other.load_state_dict(sd)


def test_bad_inputs_raise_value_error(small_vae):
    with pytest.raises(ValueError, match="strictly increasing"):
        VQVAE(SMALL, (1, 3, 2))
    with pytest.raises(ValueError, match="share_quant_resi"):
        MultiScaleQuantizer(8, 4, (1, 2), share_quant_resi=-1)
    with pytest.raises(ValueError, match="last scale is 4"):
        small_vae.img_to_idxBl(_image(1, 16))
