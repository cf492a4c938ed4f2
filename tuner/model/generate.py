"""Scale-by-scale generation with classifier-free guidance over a policy-managed KV cache.

With the ``full`` policy this reproduces the official ``VAR.autoregressive_infer_cfg(B, labels,
g_seed, cfg, top_k, top_p, more_smooth=False)``: same embeddings, same guidance ramp, same sampler
and random-number call order, same VAE decoding.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tuner.model.cache import Audit, KVCache, Observer
from tuner.model.sampling import guided_logits, sample_tokens
from tuner.options import SAMPLING
from tuner.policies.base import CacheGeometry, CachePlan, KVPolicy, PolicySpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    images: ``[B, 3, H, W]`` float32 in [0, 1]. tokens: per scale ``[B, pn*pn]`` sampled indices.
    kv_bytes_allocated: bytes of the cache's K/V buffers (measured from the buffers themselves).
    scale_seconds: wall time per scale of the transformer's loop (forward, sampling, ``f_hat`` update;
    synchronised on CUDA). decode_seconds: wall time of the VQ-VAE decode of ``f_hat`` into ``images``
    (after the loop; synchronised on CUDA the same way).
    """

    images: torch.Tensor
    tokens: list[torch.Tensor]
    plan: CachePlan
    kv_bytes_allocated: int
    index_bytes_allocated: int
    scale_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def generate(var, vae, labels: torch.Tensor, *, seed: int | None = None, cfg: float = SAMPLING.cfg,
             top_k: int = SAMPLING.top_k, top_p: float = SAMPLING.top_p, policy: KVPolicy | None = None,
             spec: PolicySpec | None = None, backend: str = "torch", dtype: torch.dtype = torch.float32,
             observer: Observer | None = None, attention: Callable | None = None,
             check_selection: bool = True, audit: Audit | None = None) -> GenerationResult:
    """Generate ``B = len(labels)`` images, one forward per scale over ``2B`` rows (CFG).

    Parameters
    ----------
    var, vae: :class:`~tuner.model.var.VARTransformer` and :class:`~tuner.model.vqvae.VQVAE` (fp32
        weights; ``dtype`` other than fp32 runs under autocast, as the official demo does).
    labels: ``[B]`` int64 class ids on the model's device.
    seed: seeds a generator on the model's device; ``None`` uses the global RNG.
    policy, spec: cache policy (default ``full``) and what it plans against.
    backend: resolved attention backend (``torch`` or ``triton``), see :mod:`varkv_kernels.dispatch`.
    observer: calibration hook, called after every layer's attention.
    audit: ``f(AttendRecord)`` after every attention call (what the cache attended to and returned).
    """
    device = labels.device
    b = labels.shape[0]
    plan, cache = _build_cache(var, b, device, policy, spec, backend=backend, dtype=dtype, observer=observer,
                               attention=attention, check_selection=check_selection, audit=audit)
    rng = None
    if seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

    quant = vae.quantize
    z = quant.embedding.weight.shape[1]
    patch_nums = var.cfg.patch_nums
    tokens, seconds = [], []
    with _autocast(device, dtype):
        step, next_map = _start(var, quant, cache, labels, z, cfg, top_k, top_p, rng)
        cur_l = 0
        f_hat = step.cond_BD.new_zeros(b, z, patch_nums[-1], patch_nums[-1])
        for si, pn in enumerate(patch_nums):
            _sync(device)
            t0 = time.perf_counter()
            cur_l += pn * pn
            idx_Bl, f_hat, next_map = step.run(si, pn, cur_l, next_map, f_hat)
            tokens.append(idx_Bl)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the loop ended synchronised: nothing of it is still queued
        images = vae.fhat_to_img(f_hat).add_(1).mul_(0.5).float()
        _sync(device)
        decode_seconds = time.perf_counter() - t0
    return GenerationResult(images=images, tokens=tokens, plan=plan, kv_bytes_allocated=cache.kv_bytes,
                            index_bytes_allocated=cache.index_bytes, scale_seconds=seconds,
                            decode_seconds=decode_seconds)


def generate_batches(var, vae, labels: torch.Tensor, batch_size: int, seed: int,
                     on_batch: Callable[[], None] | None = None, **sampling) -> tuple[torch.Tensor, int]:
    """What ``tuner generate`` (and ``tuner.generate``) runs: ``labels`` ``[N]`` in consecutive batches of
    ``batch_size``, batch ``i`` seeded ``seed + i``, each a :func:`generate` call with ``sampling`` (its
    keyword arguments: cfg, top_k, top_p, policy, spec, backend, dtype).

    ``var`` may be a loaded model (``vae`` None; VAR or Infinity, whose ``generate_chunk`` then runs
    each batch, ``labels`` its conditions). ``on_batch()`` is called after each batch. Returns
    ``(images [N, 3, H, W] float32 in [0, 1] on the CPU, the largest KV bytes one batch allocated)``.
    """
    images, kv_bytes = [], 0
    for i, chunk in enumerate(torch.split(labels, batch_size)):
        if vae is None:
            res = var.generate_chunk(chunk, seed=seed + i, **sampling)
        else:
            res = generate(var, vae, chunk, seed=seed + i, **sampling)
        images.append(res.images.cpu())
        kv_bytes = max(kv_bytes, res.kv_bytes_allocated)
        if on_batch is not None:
            on_batch()
    return torch.cat(images), kv_bytes


def _build_cache(var, b: int, device: torch.device, policy: KVPolicy | None, spec: PolicySpec | None,
                 **cache_kw) -> tuple[CachePlan, KVCache]:
    """Plan ``policy`` (default ``full``) against ``spec`` (default the bare geometry) and allocate its cache.

    ``cache_kw``: backend, dtype, observer, attention (``None``: :func:`varkv_kernels.dispatch.kv_attention`),
    check_selection and audit, as :func:`generate` received them.
    """
    from tuner.policies.full import FullPolicy

    geometry = CacheGeometry.from_var_config(var.cfg)
    policy = policy or FullPolicy()
    spec = spec or PolicySpec(geometry)
    plan = policy.plan(spec)
    if cache_kw["attention"] is None:
        from varkv_kernels.dispatch import kv_attention

        cache_kw["attention"] = kv_attention
    cache = KVCache(plan, geometry, rows=2 * b, device=device, policy=policy, **cache_kw)
    return plan, cache


@dataclass(frozen=True)
class _ScaleStep:
    """One scale of the official loop, with what every scale shares (models, cache, condition, sampler)."""

    var: object
    quant: object
    cache: KVCache
    cond_BD: torch.Tensor
    lvl_pos: torch.Tensor
    b: int
    z: int
    cfg: float
    top_k: int
    top_p: float
    rng: torch.Generator | None

    def run(self, si: int, pn: int, cur_l: int, next_map: torch.Tensor,
            f_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward scale ``si`` (``pn × pn`` tokens, ``cur_l`` tokens so far), sample it, update ``f_hat``.

        Returns ``(sampled indices [B, pn*pn], f_hat, the next scale's input map)``.
        """
        var, quant, b, z = self.var, self.quant, self.b, self.z
        num_scales, patch_nums = var.cfg.geometry.num_scales, var.cfg.patch_nums
        self.cache.begin_scale(si)
        x = var.run_blocks(next_map, var.condition(self.cond_BD), cache=self.cache)
        logits = guided_logits(var.logits(x, self.cond_BD), b, self.cfg, si, num_scales)
        idx_Bl = sample_tokens(logits, self.top_k, self.top_p, self.rng)
        h_BChw = quant.embedding(idx_Bl).transpose_(1, 2).reshape(b, z, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, num_scales, f_hat, h_BChw)
        if si != num_scales - 1:
            next_map = next_map.view(b, z, -1).transpose(1, 2)
            next_map = var.word_embed(next_map) + self.lvl_pos[:, cur_l:cur_l + patch_nums[si + 1] ** 2]
            next_map = next_map.repeat(2, 1, 1)
        return idx_Bl, f_hat, next_map


def _start(var, quant, cache: KVCache, labels: torch.Tensor, z: int, cfg: float, top_k: int, top_p: float,
           rng: torch.Generator | None) -> tuple[_ScaleStep, torch.Tensor]:
    """The class condition (labels, then the unconditional rows) and the first scale's input map."""
    b = labels.shape[0]
    cond_BD = var.class_emb(torch.cat((labels, torch.full_like(labels, var.num_classes)), dim=0))
    lvl_pos = var.lvl_pos()
    first_l = var.first_l
    next_map = (cond_BD.unsqueeze(1).expand(2 * b, first_l, -1)
                + var.pos_start.expand(2 * b, first_l, -1) + lvl_pos[:, :first_l])
    return _ScaleStep(var, quant, cache, cond_BD, lvl_pos, b, z, cfg, top_k, top_p, rng), next_map
