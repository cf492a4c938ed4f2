"""Convolutional encoder and decoder of the multi-scale VQ-VAE.

The layout (module names, nesting, channel widths) follows the official VAR tokenizer
(``VAR:models/basic_vae.py``, itself the latent-diffusion "vq-f16" autoencoder) so that
``state_dict()`` keys match ``vae_ch160v4096z32.pth``: ``conv_in``, ``down.{i}.block.{j}``,
``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``, ``mid.{block_1,attn_1,block_2}``,
``norm_out``, ``conv_out`` (and ``up.{i}...`` / ``upsample.conv`` in the decoder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """The VAE's normalisation: 32 groups, eps 1e-6, affine (as in the official tokenizer)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip; a 1x1 ``nin_shortcut`` only when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = group_norm(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        # Identity has no parameters, so the key only exists where the official file has it.
        self.nin_shortcut = conv1x1(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 ``qkv`` conv and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.qkv = conv1x1(channels, 3 * channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The fused conv's output channels are laid out [q | k | v], each `c` wide.
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        scores = torch.bmm(q.transpose(1, 2), k) * (c ** -0.5)          # [B, HWq, HWk]
        probs = scores.softmax(dim=2)
        out = torch.bmm(v, probs.transpose(1, 2)).reshape(b, c, h, w)  # [B, C, HWq]
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    """Asymmetric zero pad (right and bottom by one) then a stride-2 3x3 conv, as the official."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, using_mid_sa: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)  # empty except at the lowest resolution with using_sa
    return level


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> features ``[B, z, H/2^(n-1), W/2^(n-1)]`` with n = len(ch_mult)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool, using_mid_sa: bool, in_channels: int = 3) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        c_in = ch
        for i in range(self.num_levels):
            c_out = ch * ch_mult[i]
            lowest = i == self.num_levels - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if lowest and using_sa:
                    attns.append(AttnBlock(c_out))
            level = _level(blocks, attns)
            if not lowest:
                level.downsample = Downsample2x(c_out)
            self.down.append(level)
        self.mid = _middle(c_in, using_mid_sa)
        self.norm_out = group_norm(c_in)
        self.conv_out = conv3x3(c_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = level.block[j](h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``[B, z, h, w]`` -> image ``[B, 3, h*2^(n-1), w*2^(n-1)]`` (unclamped).

    ``up`` is stored in ascending level order (``up.0`` is the highest resolution) but run from
    the last level down, exactly like the official module, so the keys line up.
    """

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool, using_mid_sa: bool, out_channels: int = 3) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        c_in = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, c_in)
        self.mid = _middle(c_in, using_mid_sa)
        levels: list[nn.Module] = []
        for i in reversed(range(self.num_levels)):
            c_out = ch * ch_mult[i]
            lowest = i == self.num_levels - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if lowest and using_sa:
                    attns.append(AttnBlock(c_out))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample2x(c_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = conv3x3(c_in, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = level.block[j](h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
