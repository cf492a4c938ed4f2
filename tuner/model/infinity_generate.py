"""Scale-by-scale Infinity generation from text features, over a policy-managed KV cache.

With the ``full`` policy in fp32 this reproduces the official ``Infinity.autoregressive_infer_cfg``
(FoundationVision/Infinity @4c27bbb, MIT) as the official CLI calls it (``cfg_insertion_layer=[0]``,
``vae_type`` a BSQ-VAE, ``B`` prompts): the unconditional rows are the learned ``cfg_uncond`` cut to
each prompt's length; per scale the logits are divided by ``tau`` and guided as
``cfg·cond + (1−cfg)·uncond`` (the same cfg at every scale); each token's ``2·d`` logits are read as
``[d bits, 2 classes]`` and sampled with top-k/top-p and one ``multinomial`` call on the run's
generator; the bits' codes are accumulated on the last map and resized (trilinear) to the next
scale's input. Returns float RGB in [0, 1] (the official function goes on to uint8 BGR).

Deviations (deliberate, documented): cross-attention runs in the compute dtype, not bf16
(:mod:`tuner.model.infinity_blocks`); a low-precision run keeps fp32 weights under autocast and its
K/V cache in one dtype (the official bf16 run holds the blocks in bf16 and K in fp32).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tuner.errors import UserError
from tuner.model.bsq_vae import bits_to_codes
from tuner.model.cache import Audit, KVCache, Observer
from tuner.model.generate import GenerationResult
from tuner.model.infinity import interpolate_codes, pack_text, with_unconditional
from tuner.model.sampling import sample_tokens
from tuner.policies.base import KVPolicy, PolicySpec


def random_text(batch: int, text_channels: int, length: int, seed: int = 0,
                lens: Sequence[int] | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Seeded stand-in T5 features for random-weight models (no text encoder needed).

    Returns ``(features [batch, length, text_channels] float32 on the CPU, lens)``: unit-normal
    values (the model RMS-normalises them first) and per-prompt lengths (default all ``length``).
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, text_channels, generator=g)
    lens = tuple(int(n) for n in lens) if lens is not None else (length,) * batch
    return features, lens


def lens_from_mask(mask: torch.Tensor) -> tuple[int, ...]:
    """Per-prompt lengths from a tokenizer's ``[B, T]`` attention mask (valid tokens first)."""
    return tuple(int(n) for n in mask.sum(dim=-1).tolist())


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cfg_layer(cfg_insertion_layer: int, depth: int) -> int | None:
    """The block after which hidden-state guidance applies (None: guidance on the logits)."""
    if cfg_insertion_layer == 0:
        return None
    if cfg_insertion_layer < 0 and depth + cfg_insertion_layer > 0:
        return depth + cfg_insertion_layer
    raise UserError(f"cfg_insertion_layer {cfg_insertion_layer} is not valid for {depth} blocks; use 0 "
                    f"(guidance on the logits) or -1 … -{depth - 1} (on that block's output from the end)")


def check_inputs(model, vae, text: torch.Tensor, lens: Sequence[int], cfg: float, tau: float, top_k: int,
                 top_p: float) -> bool:
    """One-line :class:`UserError` for inputs the run cannot take; returns whether the model's bits are
    the BSQ-VAE's spatially patchified 2×2 cells (``d = 4 · vae bits``, the 8B layout)."""
    arch = model.cfg.arch
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or not text.is_floating_point():
        raise UserError(f"text features must be a float tensor [batch, tokens, {arch.text_channels}], got "
                        f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}; "
                        "pass the T5 encoder's last_hidden_state")
    b, t, width = text.shape
    if width != arch.text_channels:
        raise UserError(f"text features have width {width}, the model reads {arch.text_channels}-wide T5 "
                        "features; pass the text encoder this checkpoint was trained with")
    if b < 1 or t < 1:
        raise UserError(f"text features {tuple(text.shape)} hold no prompt; pass at least one token per "
                        "prompt")
    if text.device != model.cfg_uncond.device:
        raise UserError(f"text features are on {text.device}, the model on {model.cfg_uncond.device}; "
                        "move them to the model's device")
    if len(lens) != b or any(not 1 <= int(n) <= t for n in lens):
        raise UserError(f"text lengths {list(lens)} do not fit {b} prompts of up to {t} tokens; pass one "
                        "length per prompt between 1 and the padded length (lens_from_mask reads a mask)")
    if cfg != 1 and max(lens) > arch.text_maxlen:
        raise UserError(f"a prompt of {max(lens)} tokens is longer than the model's {arch.text_maxlen}-token "
                        "unconditional text; truncate the prompt")
    if not math.isfinite(cfg):
        raise UserError(f"cfg {cfg} must be a finite number; use 3 (the official default) or 1 (no guidance)")
    if not (math.isfinite(tau) and tau > 0):
        raise UserError(f"tau {tau} must be a positive temperature; use 1 (the official default)")
    if top_k < 0 or not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
        raise UserError(f"top_k {top_k} / top_p {top_p}: top_k must be >= 0 and top_p in [0, 1]; use 0 to "
                        "disable either")
    d, z = arch.codebook_dim, vae.cfg.codebook_dim
    if d not in (z, 4 * z):
        raise UserError(f"the transformer predicts {d} bits per token, the BSQ-VAE decodes {z} (or 4× that "
                        "with spatial patchify); pass the VAE this checkpoint was trained with")
    return d == 4 * z


def _next_input(model, summed: torch.Tensor, hw: tuple[int, int], patchify: bool, rows: int) -> torch.Tensor:
    """The next scale's tokens ``[rows, h·w, C]`` from the accumulated codes ``[B, z, 1, H, W]``
    resized to the scale's latent map ``hw`` (2×2 cells back into one token under patchify)."""
    nxt = interpolate_codes(summed, hw).squeeze(-3)  # [B, z, h', w']
    if patchify:
        nxt = F.pixel_unshuffle(nxt, 2)  # [B, 4z, h, w]
    b = nxt.shape[0]
    return model.embed_bits(nxt.reshape(b, nxt.shape[1], -1).permute(0, 2, 1)).repeat(rows // b, 1, 1)


@torch.no_grad()
def generate_infinity(model, vae, text: torch.Tensor, lens: Sequence[int] | None = None, *,
                      seed: int | None = None, cfg: float = 3.0, tau: float = 1.0, top_k: int = 900,
                      top_p: float = 0.97, cfg_insertion_layer: int = 0, policy: KVPolicy | None = None,
                      spec: PolicySpec | None = None, backend: str = "torch",
                      dtype: torch.dtype = torch.float32, observer: Observer | None = None,
                      attention: Callable | None = None, check_selection: bool = True,
                      audit: Audit | None = None) -> GenerationResult:
    """Generate ``B = text.shape[0]`` images, one forward per scale over ``2B`` rows (``B`` if ``cfg == 1``).

    Parameters
    ----------
    model, vae: :class:`~tuner.model.infinity.InfinityTransformer` and :class:`~tuner.model.bsq_vae.BSQVAE`
        (fp32 weights; ``dtype`` other than fp32 runs under autocast).
    text: ``[B, T, text_channels]`` T5 features on the model's device; ``lens`` the valid tokens of
        each row (default all ``T``; :func:`lens_from_mask` reads a tokenizer mask).
    seed: seeds a generator on the model's device (the official ``g_seed``); ``None``: global RNG.
    cfg, tau, top_k, top_p: guidance, temperature and bit filtering (defaults: the official CLI's; top-k
        only acts at 1, top-p drops a bit's minority class when its probability is ≤ 1 − top_p).
        cfg_insertion_layer: 0 guides the logits (the official CLI); ``-k`` the output of the k-th block
        from the end.
    policy, spec, backend, observer, attention, check_selection, audit: as
        :func:`tuner.model.generate.generate`.

    Returns a :class:`GenerationResult` whose ``tokens`` are per scale ``[B, h·w, bits]`` 0/1 int64.
    Bad inputs raise a one-line :class:`~tuner.errors.UserError` (:func:`check_inputs`).
    """
    from tuner.policies.full import FullPolicy

    b = text.shape[0] if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
    lens = tuple(int(n) for n in lens) if lens is not None else (text.shape[1],) * b if b else ()
    patchify = check_inputs(model, vae, text, lens, cfg, tau, top_k, top_p)
    device, arch, geometry = text.device, model.cfg.arch, model.cfg.geometry
    guided = cfg != 1
    rows = 2 * b if guided else b
    cfg_layer = _cfg_layer(cfg_insertion_layer, arch.depth) if guided else None
    policy = policy or FullPolicy()
    plan = policy.plan(spec or PolicySpec(geometry))
    if attention is None:
        from varkv_kernels.dispatch import kv_attention as attention
    cache = KVCache(plan, geometry, rows=rows, dtype=dtype, device=device, policy=policy, attention=attention,
                    backend=backend, observer=observer, check_selection=check_selection, audit=audit)
    rng = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def guide_hidden(layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer != cfg_layer:
            return x
        x = cfg * x[:b] + (1 - cfg) * x[b:]
        return torch.cat((x, x))

    packed = pack_text(text.float(), lens)
    if guided:
        packed = with_unconditional(packed, model.cfg_uncond)
    schedule, d = model.cfg.schedule, arch.codebook_dim
    vae_hw = [(2 * h, 2 * w) if patchify else (h, w) for h, w in schedule]
    tokens, seconds, summed = [], [], None
    with _autocast(device, dtype):
        sos, gss, ca = model.encode_text(packed)
        x = model.first_input(sos)
        rope = model.rope(device)
        for si, (h, w) in enumerate(schedule):
            _sync(device)
            t0 = time.perf_counter()
            start, n = geometry.scale_starts[si], h * w
            cache.begin_scale(si)
            x = model.run_blocks(x, si, gss, ca, rope[:, start:start + n], cache,
                                 guide_hidden if cfg_layer is not None else None)
            if guided and cfg_layer is None:
                logits = model.logits(x, sos).mul(1 / tau)
                logits = cfg * logits[:b] + (1 - cfg) * logits[b:]
            else:  # unguided, or guided on a hidden state already: the conditional rows only
                logits = model.logits(x[:b], sos[:b]).mul(1 / tau)
            bits = sample_tokens(logits.reshape(b, -1, 2), top_k, top_p, rng).reshape(b, h, w, d)
            tokens.append(bits.reshape(b, n, d))
            if patchify:  # [B, h, w, 4z] → [B, 2h, 2w, z]
                bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            codes = bits_to_codes(bits)
            if si == len(schedule) - 1:  # the last map is the accumulator's own size
                summed = codes if summed is None else summed + codes
            else:
                up = interpolate_codes(codes, vae_hw[-1])
                summed = up if summed is None else summed + up
                x = _next_input(model, summed, vae_hw[si + 1], patchify, rows)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        images = vae.decode(summed)
        _sync(device)
        decode_seconds = time.perf_counter() - t0
    return GenerationResult(images=images, tokens=tokens, plan=plan, kv_bytes_allocated=cache.kv_bytes,
                            index_bytes_allocated=cache.index_bytes, scale_seconds=seconds,
                            decode_seconds=decode_seconds)
