"""The modules of one Infinity transformer block, state-dict compatible with the official ``basic.py``.

Facts from FoundationVision/Infinity @4c27bbb (``infinity/models/basic.py``, MIT), on the official
inference path (``CrossAttnBlock`` with ``shared_aln=True``, ``fused_norm=True``, ``cos_attn=True``,
no flash kernels): pre-norm AdaLN (affine-free LayerNorm in fp32; the 6 shared modulations in the
order gamma1, gamma2, scale1, scale2, shift1, shift2), self-attention with L2-normalised q/k, a
learned per-head temperature capped at 100 and 2-D RoPE (:mod:`tuner.model.infinity_rope`), then
cross-attention to the projected text after an affine LayerNorm, then a tanh-GELU FFN.

Self-attention K/V go through :class:`tuner.model.cache.KVCache` exactly as VAR's do (every policy
works unchanged); cross-attention is recomputed from the text at every scale and never cached.

Deliberate deviation: the official ``CrossAttention`` casts q and kv to bf16 for flash-attn even in a
float32 run; here it runs in the compute dtype (fp32 on the CPU), which keeps CPU results
reproducible (a bf16 rounding of the text features flips many sampled bits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuner.model.infinity_rope import apply_rope
from tuner.model.var import FFN, max_scale_mul  # the same tanh-GELU MLP and names (fc1, fc2)

if TYPE_CHECKING:  # pragma: no cover
    from tuner.model.cache import KVCache

NORM_EPS = 1e-6


@dataclass(frozen=True)
class TextKV:
    """Text features of every row, packed as the official ``ca_kv``.

    kv: ``[N, C_kv]`` the rows' valid tokens back to back (N = Σ lens). lens: tokens per row.
    """

    kv: torch.Tensor
    lens: tuple[int, ...]


def _text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: tuple[int, ...],
                    scale: float) -> torch.Tensor:
    """Queries ``[R, H, Lq, d]`` attend to their row's text keys/values (``k``, ``v``: ``[N, H, d]``
    packed by ``lens``). Equal lengths: one batched call; ragged: one call per row (what flash-attn's
    varlen function computes). Returns ``[R, H, Lq, d]``."""
    if len(set(lens)) == 1:
        r, n = len(lens), lens[0]
        kb = k.view(r, n, *k.shape[1:]).transpose(1, 2)
        vb = v.view(r, n, *v.shape[1:]).transpose(1, 2)
        return F.scaled_dot_product_attention(q, kb, vb, scale=scale)
    outs = []
    for i, (ki, vi) in enumerate(zip(torch.split(k, list(lens)), torch.split(v, list(lens)))):
        outs.append(F.scaled_dot_product_attention(q[i], ki.transpose(0, 1), vi.transpose(0, 1), scale=scale))
    return torch.stack(outs)


class CrossAttention(nn.Module):
    """Attention of image tokens (or, ``for_attn_pool``, of one learned query per row) to the text.

    ``mat_kv`` has no bias on k (the ``zero_k_bias`` buffer), a learned one on v; plain softmax
    scaling ``1/sqrt(head_dim)`` (the official code never uses cosine attention here).
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"cross-attention width {embed_dim} is not divisible by {num_heads} heads")
        self.for_attn_pool = for_attn_pool
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor | None, text: TextKV) -> torch.Tensor:
        """x: ``[R, Lq, C]`` (None for the attention pool: ``Lq = 1``). Returns ``[R, Lq, C]``."""
        n = text.kv.shape[0]
        kv = F.linear(text.kv, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(n, 2, self.num_heads, self.head_dim).unbind(1)  # [N, H, d] each
        if self.for_attn_pool:
            rows, lq = len(text.lens), 1
            q = self.mat_q.to(kv.dtype).expand(rows, -1, -1).unsqueeze(2)  # [R, H, 1, d]
        else:
            rows, lq = x.shape[:2]
            q = self.mat_q(x).view(rows, lq, self.num_heads, self.head_dim).transpose(1, 2)
        out = _text_attention(q, k, v, text.lens, self.scale)
        return self.proj(out.transpose(1, 2).reshape(rows, lq, -1))


class SelfAttention(nn.Module):
    """Fused-qkv cosine attention with 2-D RoPE; K/V through the run's :class:`KVCache`."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def project_qkv(self, x: torch.Tensor,
                    rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[R, n, C]`` → q, k, v ``[R, H, n, head_dim]``: q/k normalised, q scaled, both rotated
        (``rope``: ``[2, n, head_dim/2]``, this scale's slice). q and k are what the cache sees."""
        r, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(r, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(max_scale_mul()).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
        k = F.normalize(k, dim=-1, eps=1e-12)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: "KVCache", layer: int) -> torch.Tensor:
        r, n, c = x.shape
        q, k, v = self.project_qkv(x, rope)
        out = cache.attend(layer, q, k, v, 1.0)  # cosine attention: the temperature is in q
        return self.proj(out.to(x.dtype).transpose(1, 2).reshape(r, n, c))


def ada_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The official fused AdaLN: affine-free LayerNorm of ``x`` in fp32, ``· (1 + scale) + shift``."""
    x = F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS)
    return x.mul(scale.add(1)).add_(shift)


class CrossAttnBlock(nn.Module):
    """One Infinity block: AdaLN self-attention, cross-attention to the text, AdaLN FFN."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_hidden: int):
        super().__init__()
        self.sa = SelfAttention(embed_dim, num_heads)
        self.ca = CrossAttention(embed_dim, embed_dim, num_heads)
        self.ffn = FFN(embed_dim, ffn_hidden)
        self.ca_norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, embed_dim))

    def forward(self, x: torch.Tensor, gss: torch.Tensor, text: TextKV, rope: torch.Tensor,
                cache: "KVCache", layer: int) -> torch.Tensor:
        """x ``[R, n, C]`` fp32; gss ``[R, 1, 6, C]`` the shared AdaLN output; returns ``[R, n, C]`` fp32."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        x = x + self.sa(ada_norm(x, scale1, shift1), rope, cache, layer).float().mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), text).float()  # ca_gamma is 1 (cross_attn_layer_scale -1)
        return x + self.ffn(ada_norm(x, scale2, shift2)).float().mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """The head's AdaLN: ``SiLU → Linear(C, 2C)`` of the start token gives scale and shift."""

    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return ada_norm(x, scale, shift)


class FastRMSNorm(nn.Module):
    """The text RMSNorm (``weight`` learned), computed in fp32 as the official fallback kernel."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(NORM_EPS))) * self.weight).to(x.dtype)
