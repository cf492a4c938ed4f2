"""An independent nn.Module reading of the official VAR classes, for the drop-in tests.

Written for these tests from the facts of the public FoundationVision/VAR code (MIT): ``models/var.py``
(``VAR``, ``SharedAdaLin``, ``autoregressive_infer_cfg``), ``models/basic_var.py`` (``SelfAttention``,
``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead``) and ``models/helpers.py``
(``sample_with_top_k_top_p_``). The module tree, attribute names and parameter names are the official
ones, so the official-format state dicts the tests create load strictly, and ``tuner.apply_policy``
meets what it meets on the real class: ``blocks[i].attn`` with ``kv_caching``, ``caching``,
``cached_k`` / ``cached_v`` (reset by ``kv_caching``, grown with ``torch.cat`` on the sequence dim),
``mat_qkv`` / ``q_bias`` / ``zero_k_bias`` / ``v_bias``, ``scale_mul_1H11`` / ``max_scale_mul``,
``scale``, ``proj``, ``proj_drop``.

Left out (unused by CPU inference): the flash-attention / xformers / fused-MLP paths (the SDPA path,
K/V laid out ``[B, H, L, head_dim]``), dropout and drop-path (identities at rate 0), progressive
training and ``more_smooth``. The VQ-VAE is the engine's (tested against the official one on its own),
behind the attributes the official VAR reads from it (:class:`OfficialVAE`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng=None,
                             num_samples: int = 1) -> torch.Tensor:
    """The official sampler: top-k, then the nucleus, in place; ``[B, l, V]`` → ``[B, l, num_samples]``."""
    b, n, vocab = logits_BlV.shape
    if top_k > 0:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    probs = logits_BlV.softmax(dim=-1).view(-1, vocab)
    return torch.multinomial(probs, num_samples=num_samples, replacement=True, generator=rng).view(b, n, -1)


class OfficialVAE:
    """What the official VAR reads from its ``vae_local``: ``Cvae``, ``vocab_size``, ``quantize``
    (``embedding``, ``get_next_autoregressive_input``) and ``fhat_to_img``."""

    def __init__(self, vae):
        self.vae = vae
        self.quantize = vae.quantize
        self.Cvae = vae.quantize.embedding.weight.shape[1]
        self.vocab_size = vae.quantize.embedding.weight.shape[0]

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(f_hat)


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100)).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.attn_drop = 0.0
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.mat_qkv.weight, bias=bias)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # BHLc
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        oup = F.scaled_dot_product_attention(query=q, key=k, value=v, scale=self.scale, attn_mask=attn_bias,
                                             dropout_p=0.0).transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(oup))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, shared_aln: bool, norm_eps: float,
                 num_heads: int, mlp_ratio: float, attn_l2_norm: bool):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path = nn.Identity()
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x, cond_BD, attn_bias):
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1),
                                         attn_bias=attn_bias).mul_(gamma1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class VAR(nn.Module):
    def __init__(self, vae_local: OfficialVAE, num_classes: int = 1000, depth: int = 16,
                 embed_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = True,
                 patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), device: str = "cpu"):
        super().__init__()
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.patch_nums = patch_nums
        self.L = sum(pn**2 for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.num_stages_minus_1 = len(patch_nums) - 1
        self.rng = torch.Generator(device=device)  # official: on dist.get_device()
        self.vae_proxy = (vae_local,)  # a tuple: not a registered submodule, as in the official class
        self.vae_quant_proxy = (vae_local.quantize,)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.num_classes = num_classes
        self.uniform_prob = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(patch_nums), self.C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
                               if shared_aln else nn.Identity())
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(i, self.C, self.D, shared_aln, norm_eps, num_heads, mlp_ratio, attn_l2_norm)
            for i in range(depth)])
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer("lvl_1L", dT[:, 0].contiguous())
        mask = torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps)
        self.head = nn.Linear(self.C, self.V)

    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0,
                                 more_smooth=False) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1], the official loop (``more_smooth`` is not read here)."""
        assert not more_smooth, "this reading leaves the visualisation-only more_smooth out"
        if g_seed is None:
            rng = None
        else:
            self.rng.manual_seed(g_seed)
            rng = self.rng
        if label_B is None:
            label_B = torch.multinomial(self.uniform_prob, num_samples=B, replacement=True,
                                        generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), fill_value=self.num_classes if label_B < 0 else label_B,
                                 device=self.lvl_1L.device)
        uncond = torch.full_like(label_B, fill_value=self.num_classes)
        sos = cond_BD = self.class_emb(torch.cat((label_B, uncond), dim=0))
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_token_map = (sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
                          + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l])
        cur_L = 0
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        for b in self.blocks:
            b.attn.kv_caching(True)
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            cur_L += pn * pn
            x = next_token_map
            for b in self.blocks:
                x = b(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)
            logits_BlV = self.get_logits(x, cond_BD)
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=top_k, top_p=top_p,
                                              num_samples=1)[:, :, 0]
            h_BChw = self.vae_quant_proxy[0].embedding(idx_Bl)
            h_BChw = h_BChw.transpose_(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_token_map = self.vae_quant_proxy[0].get_next_autoregressive_input(
                si, len(self.patch_nums), f_hat, h_BChw)
            if si != self.num_stages_minus_1:
                next_token_map = next_token_map.view(B, self.Cvae, -1).transpose(1, 2)
                next_pos = lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                next_token_map = self.word_embed(next_token_map) + next_pos
                next_token_map = next_token_map.repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)


def official_var(config, vae, state_dict, device: str = "cpu") -> VAR:
    """The reading for a :class:`~tuner.model.config.ModelConfig`, with ``state_dict`` loaded strictly,
    on ``device`` (``vae`` must be there already)."""
    v = config.var
    var = VAR(OfficialVAE(vae), num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim,
              num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, norm_eps=v.norm_eps, shared_aln=v.shared_aln,
              attn_l2_norm=v.attn_l2_norm, patch_nums=tuple(v.patch_nums), device=device)
    var.load_state_dict(state_dict, strict=True)
    return var.to(device).eval().requires_grad_(False)
