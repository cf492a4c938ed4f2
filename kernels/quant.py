"""KV storage formats: how a cached key or value vector is stored, and its exact bytes.

A cached token stores, per (row, head), one key and one value vector of ``D = head_dim`` elements.
The formats (docs/design.md, Memory; the choice is measured in experiments/quant/formats.md):

- ``compute``: the run's compute dtype, unquantized (16-bit in a GPU deployment; memory fractions
  always count it as 16 bits per element, whatever the run computes in).
- ``int8``: symmetric absmax per vector: ``x ≈ q · s`` with ``q`` int8 in [-127, 127] and one fp16
  ``s = max|x| / 127`` per (row, head, token). Data ``[..., D]`` int8, scale ``[...]`` fp16.
- ``int4``: asymmetric min/max per vector, 16 levels: ``x ≈ q · s + z`` with ``q`` in 0..15,
  ``s = (max x - min x) / 15`` and ``z = min x`` (both fp16). Two elements per byte, *half-split*:
  byte ``j`` holds element ``j`` in its low nibble and element ``j + D/2`` in its high nibble, so a
  kernel can load the two halves of the vector as two contiguous ``[*, D/2]`` tiles. Data
  ``[..., D/2]`` uint8. ``D`` must be even.

Per-vector (per token and head) scales are what the cache's compaction needs: a kept token's data and
its scales move together, nothing is ever re-quantized. Per-channel key scales (KIVI) would need
token groups that eviction breaks up; on tiny they would lower the int4 attention error by only 12%
(experiments/quant/formats.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from varkv_kernels.formats import FORMATS, KV_FORMATS, REFERENCE_BITS, FormatInfo, format_info

__all__ = ["FORMATS", "KV_FORMATS", "REFERENCE_BITS", "FormatInfo", "QuantizedKV", "dequantize",
           "empty_quantized", "format_info", "max_abs_error_bound", "quantize", "write_tokens"]

SIDE_DTYPE = torch.float16  # scales and zero points, in every run (so their bytes never depend on it)


class QuantizedKV(NamedTuple):
    """A quantized ``[R, H, C, D]`` K or V buffer (what :func:`varkv_kernels.dispatch.kv_attention` also
    accepts).

    data: ``[R, H, C, D]`` int8 (``int8``) or ``[R, H, C, D/2]`` uint8 (``int4``).
    scale: ``[R, H, C]`` fp16. zero: ``[R, H, C]`` fp16 (``int4``) or None. head_dim: ``D``.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical ``(R, H, C, D)``."""
        r, h, c = self.scale.shape
        return r, h, c, self.head_dim

    @property
    def nbytes(self) -> int:
        parts = (self.data, self.scale) + ((self.zero,) if self.zero is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)

    def narrow(self, start: int, length: int) -> "QuantizedKV":
        """Tokens ``start:start+length`` (views)."""
        z = self.zero[:, :, start:start + length] if self.zero is not None else None
        return QuantizedKV(self.fmt, self.data[:, :, start:start + length],
                           self.scale[:, :, start:start + length], z, self.head_dim)


def empty_quantized(fmt: str, rows: int, heads: int, capacity: int, head_dim: int,
                    device: torch.device | str) -> QuantizedKV:
    """An uninitialised buffer of ``capacity`` tokens in ``fmt`` (``int8`` or ``int4``)."""
    if fmt == "int8":
        data = torch.empty(rows, heads, capacity, head_dim, dtype=torch.int8, device=device)
    elif fmt == "int4":
        if head_dim % 2:
            raise ValueError(f"int4 storage needs an even head_dim, got {head_dim}")
        data = torch.empty(rows, heads, capacity, head_dim // 2, dtype=torch.uint8, device=device)
    else:
        raise ValueError(f"{fmt!r} is not a quantized format; use int8 or int4")
    scale = torch.empty(rows, heads, capacity, dtype=SIDE_DTYPE, device=device)
    zero = torch.empty_like(scale) if fmt == "int4" else None
    return QuantizedKV(fmt, data, scale, zero, head_dim)


def quantize(x: torch.Tensor, fmt: str) -> QuantizedKV:
    """Quantize ``x`` ``[R, H, N, D]`` (any float dtype) per vector; see the module docstring."""
    xf = x.float()
    if fmt == "int8":
        s = (xf.abs().amax(dim=-1) / 127.0).to(SIDE_DTYPE)
        sf = s.float()
        q = torch.where(sf[..., None] > 0, xf / sf.clamp_min(1e-30)[..., None], 0.0)
        data = q.round_().clamp_(-127, 127).to(torch.int8)
        return QuantizedKV("int8", data, s, None, x.shape[-1])
    if fmt == "int4":
        d = x.shape[-1]
        if d % 2:
            raise ValueError(f"int4 storage needs an even head_dim, got {d}")
        lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
        # Round the side values to fp16 first: the codes are chosen against what will be stored.
        z = lo.to(SIDE_DTYPE)
        s = ((hi - z.float()) / 15.0).to(SIDE_DTYPE)
        sf, zf = s.float()[..., None], z.float()[..., None]
        q = torch.where(sf > 0, (xf - zf) / sf.clamp_min(1e-30), 0.0).round_().clamp_(0, 15).to(torch.uint8)
        data = q[..., : d // 2] | (q[..., d // 2:] << 4)
        return QuantizedKV("int4", data, s, z, d)
    raise ValueError(f"{fmt!r} is not a quantized format; use int8 or int4")


def dequantize(qkv: QuantizedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[R, H, N, D]`` in ``dtype`` from a :class:`QuantizedKV` (the reference for the kernels)."""
    if qkv.fmt == "int8":
        out = qkv.data.float() * qkv.scale.float()[..., None]
    elif qkv.fmt == "int4":
        codes = torch.cat((qkv.data & 0xF, qkv.data >> 4), dim=-1).float()
        out = codes * qkv.scale.float()[..., None] + qkv.zero.float()[..., None]
    else:
        raise ValueError(f"{qkv.fmt!r} is not a quantized format; use int8 or int4")
    return out.to(dtype)


def write_tokens(dst: QuantizedKV, start: int, x: torch.Tensor) -> None:
    """Quantize ``x`` ``[R, H, n, D]`` into tokens ``start:start+n`` of ``dst``."""
    q = quantize(x, dst.fmt)
    n = x.shape[2]
    dst.data[:, :, start:start + n].copy_(q.data)
    dst.scale[:, :, start:start + n].copy_(q.scale)
    if dst.zero is not None:
        dst.zero[:, :, start:start + n].copy_(q.zero)


def max_abs_error_bound(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Per-vector bound on ``|dequantize(quantize(x)) - x|`` ``[R, H, N]``: half a step, plus the
    fp16 rounding of the side values (relative 2^-11 of the largest magnitude they reconstruct)."""
    xf = x.float()
    if fmt == "int8":
        amax = xf.abs().amax(dim=-1)
        return amax / 127.0 * 0.5 + amax * 2.0 ** -10
    if fmt == "int4":
        span = xf.amax(dim=-1) - xf.amin(dim=-1)
        return span / 15.0 * 0.5 + (xf.abs().amax(dim=-1) + span) * 2.0 ** -10
    raise ValueError(f"{fmt!r} is not a quantized format; use int8 or int4")
