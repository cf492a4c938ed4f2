"""What the max-batch estimate needs to know about a model besides its cache geometry.

:func:`model_sizing` gives every named model's :class:`ModelSizing`: the weights the official inference
holds on the GPU (parameter groups and their element sizes) and the widths the activation terms of
:func:`tuner.memory.max_batch` scale with. One function per model kind (``cfg.kind``), one table:

- ``var``: parameters counted on the meta device from our modules (no memory, no weights), fp32 as
  the official VAR demo holds them.
- ``infinity``: parameters from the architecture shapes (the formulas in
  :mod:`tuner.model.infinity_config`, equal to the official constructors' counts), held as the
  official ``tools/run_infinity.py`` holds them with its default ``--bf16 1``: the transformer's
  blocks in bf16, the rest of it in fp32, the BSQ-VAE (encoder and decoder) in fp32 and the T5 text
  encoder on the GPU in fp16, except its FFN output projections, which transformers keeps in fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WeightPart:
    """One group of parameters held on the GPU: ``params`` elements of ``bytes_per_param`` bytes."""

    name: str
    params: int
    bytes_per_param: int

    @property
    def bytes(self) -> int:
        return self.params * self.bytes_per_param


@dataclass(frozen=True)
class ModelSizing:
    """Memory facts of a model other than its KV cache.

    width: the transformer's channels per token (activations scale with it). logits_per_token: the
    head's outputs per token (VAR: the codebook; Infinity: 2 per bit). decoder_channels: channels of
    the image decoder's (``decoder_name``'s) full-resolution maps. resolution: image side in pixels
    (the height of a non-square image); image_hw: ``(height, width)`` in pixels (None: square).
    weights: the parameter groups on the GPU. weights_note: how they are held, one line (for the
    assumptions).
    """

    width: int
    logits_per_token: int
    logits_note: str
    decoder_channels: int
    decoder_name: str
    resolution: int
    weights: tuple[WeightPart, ...]
    weights_note: str
    image_hw: tuple[int, int] | None = None

    @property
    def weights_bytes(self) -> int:
        return sum(p.bytes for p in self.weights)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.weights)


@functools.lru_cache(maxsize=16)
def var_param_counts(model_cfg: Any) -> tuple[int, int]:
    """(VAR parameters, VQ-VAE parameters), counted on the meta device (no memory, no weights)."""
    import torch

    from tuner.model.loading import build_models

    with torch.device("meta"):
        var, vae = build_models(model_cfg, "meta")
    return sum(p.numel() for p in var.parameters()), sum(p.numel() for p in vae.parameters())


def _var_sizing(cfg: Any) -> ModelSizing:
    var_params, vae_params = var_param_counts(cfg)
    return ModelSizing(
        width=cfg.var.embed_dim, logits_per_token=cfg.vae.vocab_size,
        logits_note=f"vocab {cfg.vae.vocab_size}",
        decoder_channels=cfg.vae.ch * cfg.vae.ch_mult[0], decoder_name="VQ-VAE", resolution=cfg.resolution,
        weights=(WeightPart("VAR", var_params, 4), WeightPart("VQ-VAE", vae_params, 4)),
        weights_note=f"weights in fp32 ({var_params + vae_params:,} parameters)")


def _infinity_sizing(cfg: Any) -> ModelSizing:
    t, text = cfg.infinity, cfg.text_encoder
    blocks = t.depth * t.block_params()
    wo = text.wo_params()
    parts = (WeightPart("Infinity blocks", blocks, 2), WeightPart("Infinity other", t.other_params(), 4),
             WeightPart("BSQ-VAE", cfg.vae.param_count(), 4),
             WeightPart("T5 encoder", text.param_count() - wo, 2), WeightPart("T5 encoder wo", wo, 4))
    return ModelSizing(
        width=t.embed_dim, logits_per_token=2 * t.codebook_dim,
        logits_note=f"2 × {t.codebook_dim} bits (bitwise head)",
        decoder_channels=cfg.vae.decoder_out_channels, decoder_name="BSQ-VAE", resolution=cfg.resolution,
        image_hw=cfg.image_hw, weights=parts,
        weights_note=(f"weights as the official inference holds them ({sum(p.params for p in parts):,} "
                      f"parameters, {sum(p.bytes for p in parts) / 2**30:.2f} GiB): transformer blocks bf16 "
                      f"({blocks:,}), its other parameters fp32 ({t.other_params():,}), BSQ-VAE fp32 "
                      f"({cfg.vae.param_count():,}), flan-t5-xl encoder on the GPU in fp16 "
                      f"({text.param_count():,}; its FFN outputs wo in fp32, as transformers loads T5)"))


_SIZERS = {"var": _var_sizing, "infinity": _infinity_sizing}


def model_sizing(cfg: Any) -> ModelSizing:
    """The :class:`ModelSizing` of a named model's config (by its ``kind``)."""
    try:
        sizer = _SIZERS[cfg.kind]
    except (AttributeError, KeyError):
        raise ValueError(f"no sizing rules for {type(cfg).__name__} (kind {getattr(cfg, 'kind', None)!r}); "
                         f"known kinds: {', '.join(_SIZERS)}") from None
    return sizer(cfg)
