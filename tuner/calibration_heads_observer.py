"""The engine observer that measures :mod:`tuner.calibration_heads`' statistics during full-cache runs.

Called like :class:`tuner.calibration.CalibrationObserver`, after every layer's attention:
``obs(layer, scale, q [R, H, n_s, d], k_all [R, H, n, d], v_all, positions [R, H, n])``, ``k_all``
holding every token of scales ``<= scale`` (full policy). Softmax attention is recomputed in fp32 in
query chunks, so a large scale's attention matrix is never materialised whole. Everything is
accumulated per row, then per half of the images (even / odd image index), in float64 on the CPU.

Image bookkeeping: a call with ``layer == 0`` and ``scale == 0`` starts a batch (the engine's first
attention of a generation); the batch has ``R / 2`` images, row ``r`` being image ``r mod R/2``'s
conditional (``r < R/2``) or unconditional row (as :func:`tuner.model.generate.generate` lays them out).
"""
from __future__ import annotations

import math

from tuner.policies.base import CacheGeometry

QUERY_CHUNK_ELEMENTS = 1 << 24  # attention weights materialised at once (64 MiB in fp32)

FLAT_ENTROPY = 1e-6  # nats: H(m) below this means one key takes all the history attention


def dispersion_scales(geometry: CacheGeometry) -> list[int]:
    """Query scales whose history has at least 2 tokens (a dispersion needs two keys to choose from)."""
    return [s for s in range(geometry.num_scales) if geometry.scale_starts[s] >= 2]


class HeadStatsObserver:
    """Accumulates per-(layer, head) attention mass per source scale and history dispersion."""

    def __init__(self, geometry: CacheGeometry, *, softmax_scale: float = 1.0,
                 chunk_elements: int = QUERY_CHUNK_ELEMENTS):
        import torch

        self.geometry, self.softmax_scale, self.chunk_elements = geometry, softmax_scale, chunk_elements
        n, h, s = geometry.num_layers, geometry.num_heads, geometry.num_scales
        self._mass = torch.zeros(2, n, h, s, s, dtype=torch.float64)  # sums over rows, per image half
        self._disp = torch.zeros(2, n, h, s, dtype=torch.float64)
        self._rows = torch.zeros(2, n, s, dtype=torch.float64)        # rows summed per half
        self._image0, self._batch = 0, 0                               # first image of the batch, its size

    def __call__(self, layer: int, scale: int, q, k_all, v_all, positions) -> None:
        import torch

        if layer == 0 and scale == 0:
            if q.shape[0] % 2:
                raise ValueError(f"expected 2 CFG rows per image, got {q.shape[0]} rows")
            self._image0, self._batch = self._image0 + self._batch, q.shape[0] // 2
        # Statistics in fp32 even when the run uses fp16/bf16 autocast.
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            mass, ratio = self._measure(scale, q.float(), k_all.float(), positions)
        halves = (self._image0 + torch.arange(q.shape[0]) % self._batch) % 2  # [R] image half of each row
        self._mass[:, layer, :, scale].index_add_(0, halves, mass.double().cpu())
        self._rows[:, layer, scale] += torch.bincount(halves, minlength=2).double()
        if ratio is not None:
            self._disp[:, layer, :, scale].index_add_(0, halves, ratio.double().cpu())

    def _measure(self, scale: int, q, k, positions):
        """``(mass [R, H, S], dispersion [R, H] or None)`` of one scale's queries, per row."""
        import torch

        g = self.geometry
        r, h, n_s, _ = q.shape
        ends = torch.tensor([g.tokens_through(i) for i in range(g.num_scales)], device=k.device)
        key_scale = torch.bucketize(positions[0, 0].to(k.device), ends, right=True)  # [n]
        hist = (key_scale < scale).nonzero().flatten()
        with_dispersion = hist.numel() >= 2
        colsum = torch.zeros(r, h, k.shape[2], device=k.device)
        query_entropy = torch.zeros(r, h, device=k.device)
        mean_p = torch.zeros(r, h, hist.numel(), device=k.device)
        chunk = max(1, self.chunk_elements // max(1, r * h * k.shape[2]))
        for c0 in range(0, n_s, chunk):
            attn = torch.softmax(q[:, :, c0:c0 + chunk] @ k.transpose(-1, -2) * self.softmax_scale, dim=-1)
            colsum += attn.sum(2)
            if with_dispersion:
                a = attn.index_select(-1, hist)
                p = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
                query_entropy -= torch.xlogy(p, p).sum(-1).sum(-1)
                mean_p += p.sum(2)
        # Per source scale by index_select, not index_add_: deterministic on CUDA too.
        mass = torch.zeros(r, h, g.num_scales, device=k.device)
        for i in range(scale + 1):
            mass[..., i] = colsum.index_select(-1, (key_scale == i).nonzero().flatten()).sum(-1) / n_s
        if not with_dispersion:
            return mass, None
        mean_p /= n_s
        h_mean = -torch.xlogy(mean_p, mean_p).sum(-1)
        # mean_i H(p_i) <= H(mean_i p_i) by concavity; clamp only rounding.
        ratio = torch.where(h_mean > FLAT_ENTROPY, query_entropy / n_s / h_mean.clamp_min(FLAT_ENTROPY),
                            torch.ones_like(h_mean)).clamp(0.0, 1.0)
        return mass, ratio

    def finalize(self) -> dict:
        """The averaged statistics as :class:`~tuner.calibration_heads.HeadStats` fields (all but the
        contextual split); ``ValueError`` if some (layer, scale) was never observed."""
        import torch

        rows = self._rows  # [2, L, S]
        if (rows.sum(0) == 0).any():
            raise ValueError("head statistics observed no attention for some (layer, scale); was the full "
                             "policy used?")
        valid = dispersion_scales(self.geometry)

        def per_half(x, counts):  # NaN where a half saw no image
            return x / counts.where(counts > 0, torch.full_like(counts, math.nan))

        mass_halves = per_half(self._mass, rows[:, :, None, :, None])
        disp_halves = per_half(self._disp, rows[:, :, None, :])
        mass = self._mass.sum(0) / rows.sum(0)[:, None, :, None]
        disp_by_scale = self._disp.sum(0) / rows.sum(0)[:, None, :]
        nan = torch.full_like(disp_by_scale, math.nan)
        mask = torch.zeros(self.geometry.num_scales, dtype=torch.bool)
        mask[valid] = True
        disp_by_scale = disp_by_scale.where(mask, nan)
        disp_halves = disp_halves.where(mask, torch.full_like(disp_halves, math.nan))
        total = self._image0 + self._batch
        return {"mass": mass, "dispersion_by_scale": disp_by_scale, "dispersion": disp_by_scale.nanmean(-1),
                "mass_halves": mass_halves, "dispersion_halves": disp_halves.nanmean(-1),
                "half_images": ((total + 1) // 2, total // 2)}
