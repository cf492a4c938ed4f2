"""An independent, deliberately plain reading of the official ``VAR.autoregressive_infer_cfg``.

It works on the raw state dict (no engine modules, no preallocated cache, no policy hook) and grows
each layer's cache with ``torch.cat`` exactly as the official ``SelfAttention`` does, so that the
engine's ``full`` policy can be checked against it. Only the VQ-VAE (tested on its own) is shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _sample(logits, top_k, top_p, rng):
    b, n, v = logits.shape
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        srt, order = logits.sort(dim=-1)
        remove = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), -torch.inf)
    return torch.multinomial(logits.softmax(-1).view(-1, v), 1, True, generator=rng).view(b, n)


@torch.no_grad()
def official_infer(sd: dict, vae, patch_nums, labels, g_seed, cfg, top_k, top_p) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] for fp32 weights ``sd`` (an official VAR state dict)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    C = sd["class_emb.weight"].shape[1]
    H = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    hd = C // H
    n_cls = sd["class_emb.weight"].shape[0] - 1
    B = labels.shape[0]
    rng = torch.Generator().manual_seed(g_seed)
    cond = sd["class_emb.weight"][torch.cat((labels, torch.full_like(labels, n_cls)))]
    lvl_pos = sd["lvl_embed.weight"][sd["lvl_1L"]] + sd["pos_1LC"]
    first = patch_nums[0] ** 2
    x_in = (cond[:, None].expand(2 * B, first, C) + sd["pos_start"].expand(2 * B, first, C)
            + lvl_pos[:, :first])
    caches = [None] * depth
    quant = vae.quantize
    z = quant.embedding.weight.shape[1]
    f_hat = torch.zeros(B, z, patch_nums[-1], patch_nums[-1])
    cur = 0
    for si, pn in enumerate(patch_nums):
        cur += pn * pn
        x = x_in
        for i in range(depth):
            p = f"blocks.{i}."
            mods = _lin(sd, p + "ada_lin.1", F.silu(cond)).view(-1, 1, 6, C).unbind(2)
            g1, g2, s1, s2, b1, b2 = mods
            h = _ln(x) * (s1 + 1) + b1
            bias = torch.cat((sd[p + "attn.q_bias"], torch.zeros(C), sd[p + "attn.v_bias"]))
            qkv = F.linear(h, sd[p + "attn.mat_qkv.weight"], bias).view(2 * B, -1, 3, H, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            mul = sd[p + "attn.scale_mul_1H11"].clamp_max(torch.log(torch.tensor(100.0)).item()).exp()
            q = F.normalize(q, dim=-1) * mul
            k = F.normalize(k, dim=-1)
            if caches[i] is not None:
                k = torch.cat((caches[i][0], k), dim=2)
                v = torch.cat((caches[i][1], v), dim=2)
            caches[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(2 * B, -1, C)
            x = x + _lin(sd, p + "attn.proj", a) * g1
            h = _ln(x) * (s2 + 1) + b2
            x = x + _lin(sd, p + "ffn.fc2", F.gelu(_lin(sd, p + "ffn.fc1", h), approximate="tanh")) * g2
        sc, sh = _lin(sd, "head_nm.ada_lin.1", F.silu(cond)).view(-1, 1, 2, C).unbind(2)
        logits = _lin(sd, "head", _ln(x) * (sc + 1) + sh)
        t = cfg * si / (len(patch_nums) - 1)
        logits = (1 + t) * logits[:B] - t * logits[B:]
        idx = _sample(logits, top_k, top_p, rng)
        h = quant.embedding.weight[idx].transpose(1, 2).reshape(B, z, pn, pn)
        f_hat, nxt = quant.get_next_autoregressive_input(si, len(patch_nums), f_hat, h)
        if si != len(patch_nums) - 1:
            nxt = nxt.view(B, z, -1).transpose(1, 2)
            x_in = (_lin(sd, "word_embed", nxt)
                    + lvl_pos[:, cur:cur + patch_nums[si + 1] ** 2]).repeat(2, 1, 1)
    return (vae.fhat_to_img(f_hat) + 1) * 0.5
