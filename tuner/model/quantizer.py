"""Multi-scale residual vector quantizer of the VAR tokenizer (official ``VectorQuantizer2``).

A feature map ``f [B, z, H, W]`` (H = W = ``patch_nums[-1]``) is coded coarse to fine: at scale
``si`` the residual ``f - f_hat`` is area-downsampled to ``pn x pn``, each position takes its
nearest codebook row (plain L2), the chosen codes are bicubic-upsampled back to ``H x W`` (not at
the last scale), passed through a residual conv ``Phi`` and added to ``f_hat``. The ``Phi`` used by
a scale is picked the official way: the conv whose tick is nearest to ``si / (S - 1)``.

State-dict keys follow the official module: ``ema_vocab_hit_SV`` ``[S, V]``, ``embedding.weight``
``[V, z]`` and ``quant_resi.qresi_ls.{k}`` (partially shared, ``share_quant_resi >= 2``),
``quant_resi.qresi`` (one shared ``Phi``, ``share_quant_resi == 1``) or ``quant_resi.{si}``
(one per scale, ``share_quant_resi == 0``).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def phi_tick_index(si: int, num_scales: int, num_phis: int) -> int:
    """Index of the ``Phi`` conv used at scale ``si``, bit-exact with the official selection.

    The official code takes ``argmin |ticks - si/(S-1)|`` in numpy float64 with ticks
    ``linspace(1/3/K, 1-1/3/K, K)`` for K = 4 (else ``linspace(1/2/K, 1-1/2/K, K)``). Some scales
    are exact ties in real arithmetic (si = 2 and 7 of 10), so the float64 rounding of these very
    expressions decides them; float32 or torch arithmetic gives a different table.
    """
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - ratio)).item())


class Phi(nn.Conv2d):
    """``Phi(x) = (1 - r) x + r conv3x3(x)`` with ``r = |quant_resi|`` (a z -> z conv with bias)."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PhiSet(nn.Module):
    """The ``Phi`` convs of all scales; child names reproduce the official keys for each mode."""

    def __init__(self, channels: int, quant_resi: float, share_quant_resi: int, num_scales: int) -> None:
        super().__init__()
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0 (0 = one Phi per scale), got {share_quant_resi}")

        def make() -> nn.Module:  # |r| ~ 0 means "no Phi": the official uses a parameter-free Identity
            return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        self.mode = share_quant_resi
        if share_quant_resi == 0:
            for i in range(num_scales):  # keys quant_resi.{i}.*, like the official ModuleList
                self.add_module(str(i), make())
        elif share_quant_resi == 1:
            self.qresi = make()
        else:
            self.qresi_ls = nn.ModuleList(make() for _ in range(share_quant_resi))

    def phis(self) -> list[nn.Module]:
        """The distinct ``Phi`` modules, in index order."""
        if self.mode == 1:
            return [self.qresi]
        if self.mode == 0:
            return list(self.children())
        return list(self.qresi_ls)

    def __len__(self) -> int:
        return len(self.phis())

    def index(self, si: int, num_scales: int) -> int:
        return 0 if self.mode == 1 else phi_tick_index(si, num_scales, len(self))

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.phis()[self.index(si, num_scales)]


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over the scale schedule ``patch_nums`` (see the module docstring)."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...], *, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4) -> None:
        super().__init__()
        patch_nums = tuple(int(p) for p in patch_nums)
        if not patch_nums or patch_nums[0] <= 0 or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing positive ints, got {patch_nums}")
        self.vocab_size, self.z_channels = vocab_size, z_channels
        self.patch_nums, self.beta = patch_nums, beta
        # Registration order (buffer, quant_resi, embedding) mirrors the official state_dict order.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))
        self.quant_resi = PhiSet(z_channels, quant_resi, share_quant_resi, len(patch_nums))
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # Code hits since the last dead-code reset (training only; not saved in checkpoints).
        self.register_buffer("hits_since_reset", torch.zeros(vocab_size), persistent=False)
        self.record_hit = 0

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi_index(self, si: int, num_scales: int) -> int:
        """Which of the (shared) ``Phi`` convs scale ``si`` of ``num_scales`` uses."""
        return self.quant_resi.index(si, num_scales)

    def phi(self, si: int, num_scales: int) -> nn.Module:
        return self.quant_resi.select(si, num_scales)

    @torch.no_grad()
    def nearest_codes(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Codebook index ``[N]`` (int64) of the L2-nearest row for each of ``z_NC [N, z]``."""
        e = self.embedding.weight.detach()
        # Same expansion and op order as the official code, so near-ties resolve identically.
        d = z_NC.square().sum(dim=1, keepdim=True) + e.square().sum(dim=1)
        d.addmm_(z_NC, e.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    def _residual_steps(self, f: torch.Tensor) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """Run the coarse-to-fine encoding of ``f [B, z, H, W]``.

        Yields ``(si, z_NC, idx_N, f_hat)`` per scale: the vectors looked up ``[B*pn*pn, z]``,
        their codes ``[B*pn*pn]`` and the running reconstruction ``[B, z, H, W]``. ``f_hat`` carries
        gradients to the codebook and ``Phi`` when grad is enabled; the residual never does
        (the official residual only feeds the non-differentiable argmin).
        """
        b, c, h, w = f.shape
        if (h, w) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"feature map is {h}x{w} but the last scale is {self.patch_nums[-1]}; "
                             f"images must be {self.patch_nums[-1]} x the VAE downsampling factor")
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        last = self.num_scales - 1
        for si, pn in enumerate(self.patch_nums):
            z_map = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z_map.permute(0, 2, 3, 1).reshape(-1, c)
            idx_N = self.nearest_codes(z_NC)
            h_BChw = self.embedding(idx_N.view(b, pn, pn)).permute(0, 3, 1, 2)
            if si != last:
                h_BChw = F.interpolate(h_BChw, size=(h, w), mode="bicubic")
            h_BChw = self.phi(si, self.num_scales)(h_BChw.contiguous())
            f_hat = f_hat + h_BChw
            f_rest.sub_(h_BChw.detach())
            yield si, z_NC, idx_N, f_hat

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Training pass: ``(f_hat [B, z, H, W], vq_loss (scalar), usage)``.

        ``f_hat`` carries the straight-through gradient to ``f`` (value = quantized features).
        ``vq_loss`` is the official mean over scales of ``beta * mse(f_hat.detach(), f)`` (commitment,
        trains the encoder) ``+ mse(f_hat, f.detach())`` (trains codebook and ``Phi``), with ``f_hat``
        the running sum after each scale. ``usage`` is the fraction of codebook rows hit by this batch.
        """
        in_dtype = f.dtype
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            f_no_grad = f.detach()
            hits = torch.zeros(self.vocab_size, device=f.device)
            loss = f.new_zeros(())
            for si, _, idx_N, f_hat in self._residual_steps(f):
                hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                hits += hit_V
                if self.training:
                    self._record_hits(si, hit_V)
                loss = loss + (F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f_no_grad))
            loss = loss * (1.0 / self.num_scales)  # official op (differs from / S in the last bit)
            f_hat = (f_hat.detach() - f_no_grad) + f  # straight-through estimator
        if self.training:
            self.hits_since_reset += hits
        return f_hat.to(in_dtype), loss, (hits > 0).float().mean().item()

    @torch.no_grad()
    def _record_hits(self, si: int, hit_V: torch.Tensor) -> None:
        # The official EMA schedule (copy, then 0.9, then 0.99); it only ran there under DDP.
        ema = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            ema.copy_(hit_V)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hit_V * 0.1)
        else:
            ema.mul_(0.99).add_(hit_V * 0.01)
        self.record_hit += 1

    @torch.no_grad()
    def f_to_idxBl(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[B, z, H, W]`` -> per-scale codes, a list of ``[B, pn*pn]`` int64."""
        b = f.shape[0]
        return [idx.view(b, -1) for _, _, idx, _ in self._residual_steps(f)]

    @torch.no_grad()
    def f_to_fhat(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Running reconstructions after each scale, a list of ``[B, z, H, W]``."""
        return [f_hat for _, _, _, f_hat in self._residual_steps(f)]

    @torch.no_grad()
    def lookup_inputs(self, f: torch.Tensor) -> torch.Tensor:
        """Every vector the quantizer matches for ``f`` (all scales), ``[N, z]``: dead-code candidates."""
        return torch.cat([z_NC for _, z_NC, _, _ in self._residual_steps(f)], dim=0)

    @torch.no_grad()
    def reset_dead_codes(self, features: torch.Tensor, used_mask: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> int:
        """Re-initialise unused codebook rows from ``features [N, z]``; returns how many were reset.

        ``used_mask [V]`` (bool) marks live rows; by default the rows hit since the previous reset
        (training forwards count them). Dead rows get distinct random rows of ``features`` (drawn
        with replacement only when there are fewer features than dead rows), e.g. from
        :meth:`lookup_inputs` so they land where the residuals are. Resets the hit counter.
        Optimizer state (e.g. Adam moments) of the reset rows is left to the caller.
        """
        if used_mask is None:
            used_mask = self.hits_since_reset > 0
        dead = (~used_mask.to(torch.bool)).nonzero().flatten()
        self.hits_since_reset.zero_()
        if dead.numel() == 0 or features.shape[0] == 0:
            return 0
        n = features.shape[0]
        gen_device = generator.device if generator is not None else "cpu"
        if n >= dead.numel():
            pick = torch.randperm(n, generator=generator, device=gen_device)[: dead.numel()]
        else:
            pick = torch.randint(n, (dead.numel(),), generator=generator, device=gen_device)
        w = self.embedding.weight
        w.data[dead.to(w.device)] = features.reshape(n, -1)[pick.to(features.device)].to(w.device, w.dtype)
        return int(dead.numel())

    def idxBl_to_h(self, idx_Bl: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes ``[B, pn*pn]`` per scale -> code maps ``[B, z, pn, pn]``."""
        out = []
        for idx in idx_Bl:
            pn = round(idx.shape[1] ** 0.5)
            out.append(self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.z_channels, pn, pn))
        return out

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Sum code maps into ``f_hat`` (fp32 ``[B, z, H, W]``); the list of partial sums unless ``last_one``.

        ``all_to_max_scale=False`` is the official experimental variant that grows ``f_hat`` scale
        by scale (bicubic) instead of upsampling every code map to the last scale.
        """
        b, s = ms_h_BChw[0].shape[0], self.num_scales
        hw = self.patch_nums[-1] if all_to_max_scale else self.patch_nums[0]
        f_hat = ms_h_BChw[0].new_zeros(b, self.z_channels, hw, hw, dtype=torch.float32)
        partial = []
        for si, pn in enumerate(self.patch_nums):
            h = ms_h_BChw[si]
            if all_to_max_scale:
                if si < s - 1:
                    h = F.interpolate(h, size=(hw, hw), mode="bicubic")
            else:
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
            f_hat.add_(self.phi(si, s)(h))
            if not last_one:
                partial.append(f_hat.clone() if all_to_max_scale else f_hat)
        return f_hat if last_one else partial

    def idxBl_to_var_input(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input ``[B, L - first_l, z]`` (fp32) from ground-truth codes ``[B, pn*pn]``.

        Row block ``si`` holds ``f_hat`` after scales ``0..si`` area-downsampled to scale ``si+1``.
        """
        b, s, hw = idx_Bl[0].shape[0], self.num_scales, self.patch_nums[-1]
        f_hat = torch.zeros(b, self.z_channels, hw, hw, dtype=torch.float32, device=idx_Bl[0].device)
        maps = self.idxBl_to_h(idx_Bl[: s - 1])
        out = []
        for si in range(s - 1):
            f_hat.add_(self.phi(si, s)(F.interpolate(maps[si], size=(hw, hw), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            nxt = F.interpolate(f_hat, size=(pn, pn), mode="area")
            out.append(nxt.view(b, self.z_channels, -1).transpose(1, 2))
        if not out:
            return f_hat.new_zeros(b, 0, self.z_channels)
        return torch.cat(out, dim=1)

    def get_next_autoregressive_input(self, si: int, num_scales: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s code map ``h_BChw [B, z, pn, pn]`` to ``f_hat [B, z, H, W]`` IN PLACE.

        Returns ``(f_hat, next)``: ``next`` is ``f_hat`` area-downsampled to scale ``si+1``
        ``[B, z, pn', pn']``; at the last scale ``h`` is not resized and ``next`` is ``f_hat`` itself.
        """
        hw = self.patch_nums[-1]
        phi = self.phi(si, num_scales)
        if si != num_scales - 1:
            f_hat.add_(phi(F.interpolate(h_BChw, size=(hw, hw), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(phi(h_BChw))
        return f_hat, f_hat
