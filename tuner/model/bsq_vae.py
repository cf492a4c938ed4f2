"""The BSQ tokenizer's inference half: sampled bits → codes → accumulated latent → decoder → image.

Facts from FoundationVision/Infinity @4c27bbb (``infinity/models/bsq_vae/``, MIT): the quantizer is
parameter-free binary spherical quantization (``MultiScaleBSQ`` without projections): a bit ``b``
of a ``d``-bit token becomes ``(2b - 1)/sqrt(d)``, and each token's code is then L2-normalised
(``BSQ.indices_to_codes(label_type='bit_label')``). Generation sums every scale's codes, resized
trilinearly to the last map (``autoregressive_infer_cfg``), and the Flux-style decoder
(``flux_vqgan.Decoder``: no attention, GroupNorm + swish ResNet blocks, nearest ×2 upsampling) turns
the sum into an image clamped to [-1, 1].

Parameter names are the official ``decoder.*`` ones, with the official wrappers (``Conv`` holds
``conv``, ``Normalize`` holds ``norm``). The encoder is not built: inference never runs it
(:func:`tuner.model.infinity_loading.prepare_vae_state` drops its tensors).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuner.model.infinity_config import BSQVAEConfig


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """``[B, h, w, d]`` 0/1 bits → codes ``[B, d, 1, h, w]`` (the official bit-label lookup)."""
    d = bits.shape[-1]
    scale = 1 / math.sqrt(d)  # the official codebook_scale, 1/np.sqrt(d) (the same double)
    codes = F.normalize(bits * scale * 2 - scale, dim=-1)
    return codes.permute(0, 3, 1, 2).unsqueeze(2)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # the official ``swish`` (not F.silu: a different rounding)


class _Conv(nn.Module):
    """The official ``Conv`` wrapper (2-D): the ``nn.Conv2d`` sits under ``conv``."""

    def __init__(self, i: int, o: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(i, o, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    """The official ``Normalize``: GroupNorm of 32 groups (24 when 32 does not divide), eps 1e-6."""

    def __init__(self, ch: int):
        super().__init__()
        groups = 32 if ch % 32 == 0 else 24 if ch % 24 == 0 else 0
        if not groups:
            raise ValueError(f"BSQ-VAE channels {ch} are not a multiple of 32 or 24 (GroupNorm groups)")
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ResBlock(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.norm1, self.conv1 = _Norm(i), _Conv(i, o, 3)
        self.norm2, self.conv2 = _Norm(o), _Conv(o, o, 3)
        self.nin_shortcut = _Conv(i, o, 1) if i != o else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _Conv(ch, ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class BSQDecoder(nn.Module):
    """``[B, d, H, W]`` latent → ``[B, 3, H·patch, W·patch]`` in [-1, 1] (official ``Decoder``)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult, levels = cfg.base_ch, cfg.ch_mult, len(cfg.ch_mult)
        steps = cfg.patch_size.bit_length() - 1  # log2(patch_size) upsampling steps
        block_in = ch * mult[-1]
        self.conv_in = _Conv(cfg.codebook_dim, block_in, 3)
        self.mid = nn.Module()
        self.mid.block_1 = _ResBlock(block_in, block_in)
        self.mid.block_2 = _ResBlock(block_in, block_in)
        ups: list[nn.Module] = []
        for lvl in reversed(range(levels)):
            up = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResBlock(block_in, ch * mult[lvl]))
                block_in = ch * mult[lvl]
            up.block = nn.ModuleList(blocks)
            if 1 <= lvl <= steps:
                up.upsample = _Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _Norm(block_in)
        self.conv_out = _Conv(block_in, 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQVAE(nn.Module):
    """The tokenizer as inference uses it: :func:`bits_to_codes` and the decoder (``decoder.*`` keys)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = BSQDecoder(cfg)

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """``[B, d, 1, H, W]`` accumulated codes → images ``[B, 3, H·p, W·p]`` float32 in [0, 1]."""
        img = self.decoder(summed_codes.squeeze(-3)).clamp(-1, 1)
        return ((img + 1) / 2).float()
