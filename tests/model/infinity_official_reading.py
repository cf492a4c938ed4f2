"""An independent, deliberately plain reading of the official Infinity inference, and official-format
random checkpoints.

Written from FoundationVision/Infinity @4c27bbb (``Infinity.autoregressive_infer_cfg`` with the
official CLI's flags, ``basic.py``, ``bsq_vae/``), as plain functions over raw state dicts: no engine
module, no preallocated cache, no policy hook. Each layer's K/V grow with ``torch.cat`` as the official
``SelfAttention`` caches them; cross-attention is one ``scaled_dot_product_attention`` per prompt (what
flash-attn's varlen kernel computes), in float32 instead of the official bf16 cast (the engine's
documented deviation); the BSQ-VAE decoder is read from its state dict too.

The state-dict makers list the official parameter names and shapes (as the official constructors
register them with ``shared_aln=True``, ``block_chunks > 1``, ``cnn_type='2d'``), so loading them
through the product checks its key format.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

SIDES_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # dynamic_resolution_h_w[1.0]['1M']
# The last map of dynamic_resolution_h_w[h_div_w]['1M'] (what RoPE positions are spread over), per ratio.
LAST_1M = {1.0: (64, 64), 2.0: (90, 45), 0.5: (45, 90), 1.333: (72, 54), 0.75: (54, 72)}
GRID = 128  # precompute_rope2d_freqs_grid: max_height = max_width = 2048 // 16


def _value(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    n = torch.randn(shape, generator=g)
    if name.endswith("zero_k_bias"):
        return torch.zeros(shape)
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0) + 0.5 * n
    if "norm" in name and name.endswith("weight") and len(shape) == 1:
        return 1.0 + 0.1 * n
    if name.endswith(("ada_gss", "pos_start", "lvl_embed.weight")):
        return 0.5 * n
    if len(shape) >= 2:
        return n / math.sqrt(math.prod(shape[1:])) * (4.0 if name == "head.weight" else 1.0)
    return 0.05 * n


def official_infinity_state_dict(depth: int, width: int, heads: int, bits: int, text_channels: int,
                                 text_maxlen: int, chunks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official ``Infinity`` names (text-to-image, shared AdaLN, bit labels)."""
    c, ct, hidden = width, text_channels, round(width * 4 / 256) * 256
    pool_heads = ct // (64 if c > 4096 else 128)
    shapes = {"cfg_uncond": (text_maxlen, ct), "pos_start": (1, 1, c), "text_norm.weight": (ct,),
              "text_proj_for_sos.ca.mat_q": (1, pool_heads, c // pool_heads),
              "text_proj_for_sos.ca.v_bias": (c,), "text_proj_for_sos.ca.zero_k_bias": (c,),
              "text_proj_for_sos.ca.mat_kv.weight": (2 * c, ct), "text_proj_for_sos.ca.proj.weight": (c, c),
              "text_proj_for_sos.ca.proj.bias": (c,), "text_proj_for_ca.0.weight": (c, ct),
              "text_proj_for_ca.0.bias": (c,), "text_proj_for_ca.2.weight": (c, c),
              "text_proj_for_ca.2.bias": (c,),
              "lvl_embed.weight": (15, c), "word_embed.weight": (c, bits), "word_embed.bias": (c,),
              "shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,),
              "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
              "head.weight": (2 * bits, c), "head.bias": (2 * bits,)}
    block = {"ada_gss": (1, 1, 6, c), "sa.scale_mul_1H11": (1, heads, 1, 1), "sa.q_bias": (c,),
             "sa.v_bias": (c,), "sa.zero_k_bias": (c,), "sa.mat_qkv.weight": (3 * c, c),
             "sa.proj.weight": (c, c), "sa.proj.bias": (c,),
             "ca.v_bias": (c,), "ca.zero_k_bias": (c,), "ca.mat_q.weight": (c, c), "ca.mat_q.bias": (c,),
             "ca.mat_kv.weight": (2 * c, c), "ca.proj.weight": (c, c), "ca.proj.bias": (c,),
             "ffn.fc1.weight": (hidden, c), "ffn.fc1.bias": (hidden,), "ffn.fc2.weight": (c, hidden),
             "ffn.fc2.bias": (c,), "ca_norm.weight": (c,), "ca_norm.bias": (c,)}
    for i in range(depth):
        for k, s in block.items():
            shapes[f"block_chunks.{i // (depth // chunks)}.module.{i % (depth // chunks)}.{k}"] = s
    g = torch.Generator().manual_seed(seed)
    return {k: _value(k, s, g) for k, s in shapes.items()}


def official_bsq_state_dict(z: int, base_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                            patch_size: int, seed: int = 0, flat: bool = False) -> dict[str, dict]:
    """``{"vae": ...}`` as ``infinity_vae_*.pth``: the decoder's tensors (wrapper names ``.conv.`` /
    ``.norm.``, or the flat names ``load_cnn`` also accepts), plus encoder and quantizer entries."""
    def conv(p, i, o, k):
        w = "" if flat else ".conv"
        return {f"{p}{w}.weight": (o, i, k, k), f"{p}{w}.bias": (o,)}

    def norm(p, ch):
        w = "" if flat else ".norm"
        return {f"{p}{w}.weight": (ch,), f"{p}{w}.bias": (ch,)}

    def res(p, i, o):
        out = {**norm(p + ".norm1", i), **conv(p + ".conv1", i, o, 3), **norm(p + ".norm2", o),
               **conv(p + ".conv2", o, o, 3)}
        return {**out, **conv(p + ".nin_shortcut", i, o, 1)} if i != o else out

    block_in = base_ch * ch_mult[-1]
    shapes = {**conv("decoder.conv_in", z, block_in, 3), **res("decoder.mid.block_1", block_in, block_in),
              **res("decoder.mid.block_2", block_in, block_in)}
    for lvl in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            shapes.update(res(f"decoder.up.{lvl}.block.{j}", block_in, base_ch * ch_mult[lvl]))
            block_in = base_ch * ch_mult[lvl]
        if 1 <= lvl <= math.log2(patch_size):
            shapes.update(conv(f"decoder.up.{lvl}.upsample.conv", block_in, block_in, 3))
    shapes.update({**norm("decoder.norm_out", block_in), **conv("decoder.conv_out", block_in, 3, 3),
                   **conv("encoder.conv_in", 3, base_ch, 3)})
    g = torch.Generator().manual_seed(seed)
    sd = {k: _value(k, s, g) for k, s in shapes.items()}
    mask = 2 ** torch.arange(z - 1, -1, -1)
    return {"vae": {**sd, "quantizer.lfq.mask": mask, "quantize.lfq.mask": mask.clone()}}


# Test sizes: depth 2 in 2 chunks (names block_chunks.{0,1}.module.0), width 64 (FFN 256), 4 heads of 16,
# 8 bits per token, 256-wide text (2 attention-pool heads), 16 text tokens.
ARCH = {"depth": 2, "width": 64, "heads": 4, "bits": 8, "text_channels": 256, "text_maxlen": 16, "chunks": 2}
VAE = {"z": 8, "base_ch": 32, "ch_mult": (1, 1, 2, 2, 2), "num_res_blocks": 1, "patch_size": 16}
# 8B-style spatial patchify: 2-bit latent cells, 2×2 of them per 8-bit token, patch 8.
VAE_PATCHIFY = {"z": 2, "base_ch": 32, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 1, "patch_size": 8}


def write_official_checkpoints(directory, vae: dict = VAE, seed: int = 0, flat_vae: bool = False):
    """``(model_path, vae_path, model_sd, vae_sd)``: random official-format files written with
    ``torch.save`` (the VAE under ``"vae"``, as ``infinity_vae_*.pth``); ``vae_sd`` with wrapper names."""
    from pathlib import Path

    d = Path(directory)
    sd = official_infinity_state_dict(**ARCH, seed=seed)
    vae_file = official_bsq_state_dict(**vae, seed=seed + 1, flat=flat_vae)
    model_path, vae_path = d / "infinity_test.pth", d / "infinity_vae_test.pth"
    torch.save(sd, model_path)
    torch.save(vae_file, vae_path)
    wrapped = official_bsq_state_dict(**vae, seed=seed + 1)["vae"]
    return model_path, vae_path, sd, wrapped


# ----------------------------------------------------------------------------- the inference path
def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _per_prompt_attention(q, k, v, q_lens, kv_lens, scale):
    """Packed ``q [Nq, H, d]``, ``k, v [Nk, H, d]``: each prompt's queries attend to its own keys."""
    out, qs, ks = [], 0, 0
    for nq, nk in zip(q_lens, kv_lens):
        qi, ki, vi = (t.transpose(0, 1) for t in (q[qs:qs + nq], k[ks:ks + nk], v[ks:ks + nk]))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1))
        qs, ks = qs + nq, ks + nk
    return torch.cat(out)


def _cross(sd, p, q_in, kv, lens, heads, width):
    """Cross-attention ``p`` (``mat_q`` a Linear, or the pool's learned query when ``q_in`` is None)."""
    n, d = kv.shape[0], width // heads
    kvp = F.linear(kv, sd[p + "mat_kv.weight"], torch.cat((sd[p + "zero_k_bias"], sd[p + "v_bias"])))
    k, v = kvp.view(n, 2, heads, d).unbind(1)
    rows = len(lens)
    if q_in is None:
        q, lq = sd[p + "mat_q"].repeat(rows, 1, 1), 1
    else:
        lq = q_in.shape[1]
        q = _lin(sd, p + "mat_q", q_in).reshape(-1, heads, d)
    out = _per_prompt_attention(q, k, v, [lq] * rows, lens, 1 / math.sqrt(d))
    return _lin(sd, p + "proj", out.reshape(rows, lq, width))


def _rope_cache(head_dim, shapes, last):
    """``[2, L, head_dim/2]``: the official table of a ratio (positions spread over its 1M map ``last``,
    64×64 at 1:1), for the ``(h, w)`` maps of this prefix of its schedule."""
    half = head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    f = torch.outer(torch.arange(GRID, dtype=torch.int64).float(), inv)
    grid = torch.cat((f[:, None, :].expand(-1, GRID, -1), f[None, :, :].expand(GRID, -1, -1)), dim=-1)
    grid = torch.stack((grid.cos(), grid.sin()))
    parts = []
    for h, w in shapes:
        i = (torch.arange(h) * (last[0] / h)).round().int()
        j = (torch.arange(w) * (last[1] / w)).round().int()
        parts.append(grid[:, i.view(h, 1).expand(h, w).reshape(-1), j.view(1, w).expand(h, w).reshape(-1)])
    return torch.cat(parts, dim=1)


def _rotate(x, rc):
    x = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack((rc[0] * x[..., 0] - rc[1] * x[..., 1], rc[1] * x[..., 0] + rc[0] * x[..., 1]),
                       dim=-1).flatten(-2)


def _sample(logits, top_k, top_p, rng):
    b, n, v = logits.shape
    if top_k > 0:
        kth = logits.topk(min(top_k, v), dim=-1).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        srt, order = logits.sort(dim=-1)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return torch.multinomial(logits.softmax(-1).view(-1, v), 1, True, generator=rng).view(b, n)


def _decode(vsd, z):
    """The BSQ-VAE decoder (GroupNorm + swish ResNet blocks, nearest ×2 upsampling), clamped to [-1, 1]."""
    def w(p):
        return vsd[p + ".conv.weight"], vsd[p + ".conv.bias"]

    def conv(p, x):
        wt, bs = w(p)
        return F.conv2d(x, wt, bs, padding=wt.shape[-1] // 2)

    def gn(p, x):
        groups = 32 if x.shape[1] % 32 == 0 else 24
        return F.group_norm(x, groups, vsd[p + ".norm.weight"], vsd[p + ".norm.bias"], 1e-6)

    def swish(x):
        return x * torch.sigmoid(x)

    def res(p, x):
        h = conv(p + ".conv2", swish(gn(p + ".norm2", conv(p + ".conv1", swish(gn(p + ".norm1", x))))))
        return (conv(p + ".nin_shortcut", x) if p + ".nin_shortcut.conv.weight" in vsd else x) + h

    h = res("decoder.mid.block_2", res("decoder.mid.block_1", conv("decoder.conv_in", z)))
    levels = 1 + max(int(k.split(".")[2]) for k in vsd if k.startswith("decoder.up."))
    for lvl in reversed(range(levels)):
        j = 0
        while f"decoder.up.{lvl}.block.{j}.conv1.conv.weight" in vsd:
            h = res(f"decoder.up.{lvl}.block.{j}", h)
            j += 1
        if f"decoder.up.{lvl}.upsample.conv.conv.weight" in vsd:
            h = conv(f"decoder.up.{lvl}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    return conv("decoder.conv_out", swish(gn("decoder.norm_out", h))).clamp(-1, 1)


@torch.no_grad()
def official_infer(sd: dict, vae_sd: dict, sides, features: torch.Tensor,
                   lens: list[int], g_seed: int, cfg: float, tau: float, top_k: int, top_p: float,
                   cfg_insertion_layer: int = 0, patchify: bool = False,
                   h_div_w: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(bits per scale [B, h·w, d] int64, images [B, 3, H, W] in [0, 1])`` for fp32 state dicts
    (``sd`` the transformer's, ``vae_sd`` the VAE's with wrapper names) and padded ``features [B, T, Ct]``.

    ``sides``: the square sides of a 1:1 prefix, or the ``(h, w)`` maps of a prefix of the ``h_div_w``
    schedule (:data:`LAST_1M` names the ratios this reading knows)."""
    found = {m.groups() for k in sd if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))}
    blocks = [f"block_chunks.{a}.module.{j}" for a, j in sorted(found, key=lambda t: (int(t[0]), int(t[1])))]
    c, d = sd["word_embed.weight"].shape
    heads = sd[blocks[0] + ".sa.scale_mul_1H11"].shape[1]
    ct = sd["cfg_uncond"].shape[1]
    hd, b = c // heads, features.shape[0]
    kv = torch.cat([f[:n] for f, n in zip(features, lens)])
    guided = cfg != 1
    if guided:
        kv = torch.cat((kv, torch.cat([sd["cfg_uncond"][:n] for n in lens])))
        lens = list(lens) * 2
    bs = len(lens)
    kv = kv * torch.rsqrt(kv.pow(2).mean(-1, keepdim=True).add_(1e-6)) * sd["text_norm.weight"]
    sos = _cross(sd, "text_proj_for_sos.ca.", None, kv, lens, ct // (64 if c > 4096 else 128), c).squeeze(1)
    ca_kv = _lin(sd, "text_proj_for_ca.2", F.gelu(_lin(sd, "text_proj_for_ca.0", kv), approximate="tanh"))
    gss = _lin(sd, "shared_ada_lin.1", F.silu(sos)).view(-1, 1, 6, c)
    shapes = [(s, s) if isinstance(s, int) else tuple(s) for s in sides]
    rope = _rope_cache(hd, shapes, LAST_1M[h_div_w])
    cap = torch.log(torch.tensor(100)).item()
    rng = torch.Generator().manual_seed(g_seed)
    at = len(blocks) + cfg_insertion_layer if cfg_insertion_layer < 0 else None
    x = sos[:, None] + sd["pos_start"]
    caches, bits_out, summed, start = [None] * len(blocks), [], None, 0
    vae_shapes = [(2 * h, 2 * w) if patchify else (h, w) for h, w in shapes]
    for si, (side_h, side_w) in enumerate(shapes):
        n = side_h * side_w
        rc = rope[:, start:start + n]
        x = x + sd["lvl_embed.weight"][si]
        for i, p in enumerate(blocks):
            g1, g2, s1, s2, b1, b2 = (sd[p + ".ada_gss"] + gss).unbind(2)
            h = F.layer_norm(x, (c,), eps=1e-6) * (s1 + 1) + b1
            bias = torch.cat((sd[p + ".sa.q_bias"], sd[p + ".sa.zero_k_bias"], sd[p + ".sa.v_bias"]))
            qkv = F.linear(h, sd[p + ".sa.mat_qkv.weight"], bias).view(bs, n, 3, heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            mul = sd[p + ".sa.scale_mul_1H11"].clamp_max(cap).exp()
            q, k = _rotate(F.normalize(q, dim=-1) * mul, rc), _rotate(F.normalize(k, dim=-1), rc)
            if caches[i] is not None:
                k, v = torch.cat((caches[i][0], k), dim=2), torch.cat((caches[i][1], v), dim=2)
            caches[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(bs, n, c)
            x = x + _lin(sd, p + ".sa.proj", a) * g1
            normed = F.layer_norm(x, (c,), sd[p + ".ca_norm.weight"], sd[p + ".ca_norm.bias"], 1e-6)
            x = x + _cross(sd, p + ".ca.", normed, ca_kv, lens, heads, c)
            h = F.layer_norm(x, (c,), eps=1e-6) * (s2 + 1) + b2
            x = x + _lin(sd, p + ".ffn.fc2", F.gelu(_lin(sd, p + ".ffn.fc1", h), approximate="tanh")) * g2
            if guided and i == at:
                x = cfg * x[:b] + (1 - cfg) * x[b:]
                x = torch.cat((x, x))
        rows = bs if guided and at is None else b
        sc, sh = _lin(sd, "head_nm.ada_lin.1", F.silu(sos[:rows])).view(-1, 1, 2, c).unbind(2)
        logits = _lin(sd, "head", F.layer_norm(x[:rows], (c,), eps=1e-6) * (sc + 1) + sh).mul(1 / tau)
        if rows == bs and guided:
            logits = cfg * logits[:b] + (1 - cfg) * logits[b:]
        bits = _sample(logits.reshape(b, -1, 2), top_k, top_p, rng).reshape(b, side_h, side_w, d)
        bits_out.append(bits.reshape(b, n, d))
        if patchify:
            bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        scale = 1 / math.sqrt(bits.shape[-1])
        codes = F.normalize(bits * scale * 2 - scale, dim=-1).permute(0, 3, 1, 2).unsqueeze(2)
        last = vae_shapes[-1]
        if si == len(shapes) - 1:
            summed = codes if summed is None else summed + codes
        else:
            up = F.interpolate(codes, size=(1, *last), mode="trilinear")
            summed = up if summed is None else summed + up
            nxt = F.interpolate(summed, size=(1, *vae_shapes[si + 1]), mode="trilinear")[:, :, 0]
            if patchify:
                nxt = F.pixel_unshuffle(nxt, 2)
            x = _lin(sd, "word_embed", nxt.flatten(2).transpose(1, 2)).repeat(bs // b, 1, 1)
        start += n
    return bits_out, (_decode(vae_sd, summed[:, :, 0]) + 1) / 2
