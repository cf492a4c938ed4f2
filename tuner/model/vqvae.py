"""The multi-scale VQ-VAE (tokenizer) of VAR, key-for-key compatible with ``vae_ch160v4096z32.pth``.

Images are ``[B, 3, H, W]`` in [-1, 1] with ``H = W = patch_nums[-1] * cfg.downsample``. The
encoder and a 3x3 ``quant_conv`` give features ``f [B, z, H/d, W/d]``; the
:class:`~tuner.model.quantizer.MultiScaleQuantizer` codes them into one ``[B, pn*pn]`` index map per
scale; ``post_quant_conv`` and the decoder map ``f_hat`` back to pixels. Submodule names
(``encoder``, ``decoder``, ``quantize``, ``quant_conv``, ``post_quant_conv``) are the official ones.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tuner.model.config import VAEConfig
from tuner.model.quantizer import MultiScaleQuantizer
from tuner.model.vae_blocks import Decoder, Encoder

EMA_KEY = "quantize.ema_vocab_hit_SV"


class VQVAE(nn.Module):
    """Multi-scale residual VQ-VAE for ``cfg`` and the scale schedule ``patch_nums``.

    Unlike the official class it is not frozen at construction (the ``tiny`` tokenizer is trained
    with it); call ``.eval()`` / ``requires_grad_(False)`` for inference.
    """

    def __init__(self, cfg: VAEConfig, patch_nums: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(int(p) for p in patch_nums)
        arch = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    z_channels=cfg.z_channels, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, self.patch_nums, beta=cfg.beta,
                                            quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @property
    def resolution(self) -> int:
        """Image side the schedule implies (``patch_nums[-1] * downsample``)."""
        return self.patch_nums[-1] * self.cfg.downsample

    def encode_features(self, img: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> continuous features ``[B, z, H/d, W/d]`` (before quantization)."""
        return self.quant_conv(self.encoder(img))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Training pass: ``(rec_img [B, 3, H, W] (unclamped), vq_loss (scalar), usage in [0, 1])``.

        Gradients reach the encoder through the straight-through estimator; ``vq_loss`` is the
        quantizer's commitment + codebook loss (``cfg.beta`` weights the commitment term); ``usage``
        is the fraction of codebook rows hit by this batch over all scales.
        """
        f_hat, vq_loss, usage = self.quantize(self.encode_features(img))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, usage

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``f_hat [B, z, h, w]`` -> image ``[B, 3, h*d, w*d]`` clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Image ``[B, 3, H, W]`` in [-1, 1] -> per-scale codes, a list of ``[B, pn*pn]`` int64."""
        return self.quantize.f_to_idxBl(self.encode_features(img))

    def idxBl_to_img(self, idx_Bl: list[torch.Tensor], same_shape: bool = True,
                     last_one: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Per-scale codes ``[B, pn*pn]`` -> image ``[B, 3, H, W]`` in [-1, 1].

        With ``last_one=False`` a list with the image after each scale (official semantics);
        ``same_shape=False`` is the official experimental progressive-upsampling variant.
        """
        maps = self.quantize.idxBl_to_h(idx_Bl)
        f_hat = self.quantize.embed_to_fhat(maps, all_to_max_scale=same_shape, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f_hat)
        return [self.fhat_to_img(f) for f in f_hat]

    @torch.no_grad()
    def img_to_reconstructed_img(self, img: torch.Tensor,
                                 last_one: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Encode, quantize and decode ``img``; with ``last_one=False`` the image after every scale."""
        f_hats = self.quantize.f_to_fhat(self.encode_features(img))
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f) for f in f_hats]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that tolerates another number of scales in the usage stats.

        As in the official class, an ``ema_vocab_hit_SV`` whose first dim (scales) differs from
        this model's is ignored and this model's own buffer is kept; the caller's dict is not modified.
        """
        ema = state_dict.get(EMA_KEY)
        own = self.quantize.ema_vocab_hit_SV
        if ema is not None and ema.shape[0] != own.shape[0]:
            state_dict = dict(state_dict)
            state_dict[EMA_KEY] = own.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
