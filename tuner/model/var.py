"""The VAR transformer, state-dict compatible with the official ``var_d{N}.pth`` checkpoints.

Architecture (facts from the official implementation, FoundationVision/VAR, models/var.py):
class embedding doubling as AdaLN condition, learned absolute positions per scale + a level
embedding, pre-norm AdaLN blocks (affine-free LayerNorm, 6 modulation vectors in the order
gamma1, gamma2, scale1, scale2, shift1, shift2), cosine attention (L2-normalised q/k, per-head
learned temperature capped at 100) and an AdaLN head.

Attention is routed through one object: ``KVCache.attend`` at inference (the policy hook lives
there), masked SDPA for teacher-forced training.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuner.model.config import VARConfig

if TYPE_CHECKING:  # pragma: no cover
    from tuner.model.cache import KVCache


@functools.lru_cache(maxsize=1)
def max_scale_mul() -> float:
    """The cap on the learned temperature: log(100) computed in float32, as the official code does.

    Computed on first use (on the CPU, whatever the ambient default device), not at import.
    """
    return float(torch.log(torch.tensor(100.0, device="cpu")).item())


class SelfAttention(nn.Module):
    """Fused-qkv attention with separate q/v biases (k has a zero bias buffer)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        c, h = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = h, c // h
        self.attn_l2_norm = cfg.attn_l2_norm
        if cfg.attn_l2_norm:
            self.softmax_scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, h, 1, 1), 4.0).log())
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.proj = nn.Linear(c, c)

    def project_qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, L, C]`` → q, k, v each ``[B, H, L, head_dim]`` (q/k normalised and scaled for VAR)."""
        b, n, c = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(max_scale_mul()).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        b, n, c = x_BLC.shape
        q, k, v = self.project_qkv(x_BLC)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.softmax_scale)
        else:
            out = cache.attend(layer, q, k, v, self.softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """One transformer block with adaptive LayerNorm modulation from the class condition."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = cfg.embed_dim
        self.C = c
        self.shared_aln = cfg.shared_aln
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)  # cond: [B, 1, 6, C] from shared_ada_lin
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.ln(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn(h, attn_bias=attn_bias, cache=cache, layer=layer).mul_(gamma1)
        h = self.ln(x).mul(scale2.add(1)).add_(shift2)
        return x + self.ffn(h).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.C = c
        self.ln = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """Linear(D, 6C) whose output is viewed ``[B, 1, 6, C]`` (d36-style shared AdaLN)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VARTransformer(nn.Module):
    """Class-conditional next-scale transformer; parameter names match the official ``VAR``.

    ``vae_z`` is the VQ-VAE latent width (32 for the official tokenizer), ``vocab`` its codebook size.
    """

    def __init__(self, cfg: VARConfig, vae_z: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        c, L = cfg.embed_dim, cfg.geometry.seq_len
        self.num_classes = cfg.num_classes
        self.first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(vae_z, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, c))
        self.lvl_embed = nn.Embedding(cfg.geometry.num_scales, c)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        )
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, vocab)
        levels = torch.cat([torch.full((n,), i) for i, n in enumerate(cfg.geometry.scale_lengths)]).view(1, L)
        self.register_buffer("lvl_1L", levels.contiguous())
        mask = torch.where(levels.view(1, L, 1) >= levels.view(1, 1, L), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.reshape(1, 1, L, L).contiguous())

    # ------------------------------------------------------------------ pieces used by generation
    def lvl_pos(self) -> torch.Tensor:
        """``[1, L, C]`` level + absolute position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What every block receives: the raw class embedding, or the shared AdaLN output."""
        return self.shared_ada_lin(cond_BD)

    def logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """``[B, l, C]`` → fp32 logits ``[B, l, vocab]`` (head in fp32, as the official code)."""
        return self.head(self.head_nm(x_BLC.float(), cond_BD).float()).float()

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attn_bias=None, cache=None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cond, attn_bias=attn_bias, cache=cache, layer=i)
        return x

    # ------------------------------------------------------------------ teacher-forced training
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                cond_drop_rate: float | None = None) -> torch.Tensor:
        """Teacher forcing: labels ``[B]``, VAE inputs ``[B, L - first_l, z]`` → logits ``[B, L, V]``.

        Labels are replaced by the null class with probability ``cond_drop_rate`` (CFG training).
        """
        b = x_BLCv_wo_first_l.shape[0]
        drop = self.cfg.cond_drop_rate if cond_drop_rate is None else cond_drop_rate
        if drop > 0:
            label_B = torch.where(torch.rand(b, device=label_B.device) < drop, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos = cond_BD.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_pos()
        x = self.run_blocks(x, self.condition(cond_BD), attn_bias=self.attn_bias_for_masking)
        return self.logits(x, cond_BD)
