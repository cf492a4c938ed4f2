"""A K or V buffer whose heads hold different numbers of tokens, packed without padding.

Per-head budgets (docs/design.md, Policies and Memory) give head ``h`` of a layer its own capacity
``C_h``. :class:`PackedKV` stores the heads' segments back to back on one token axis, so the buffer
holds ``T = Σ_h C_h`` tokens per row, not ``H × max_h C_h``: the bytes really shrink.

``store`` is ``[R, 1, T, D]``: a plain tensor (format ``compute``) or a
:class:`~varkv_kernels.quant.QuantizedKV` (int8 / int4 plus fp16 scales ``[R, 1, T]``). Why a head axis of 1
instead of ``[R, T, D]``: every format routine (quantize, dequantize, narrow, the kernels' per-token
strides) already works on a token axis at dim 2, so the packed buffer reuses all of them unchanged and a
head's segment is a view ``store[:, :, offsets[h]:offsets[h+1]]`` of the same kind as an unpacked buffer.

:func:`varkv_kernels.dispatch.kv_attention` accepts a :class:`PackedKV` pair wherever it accepts
``[R, H, C, D]`` buffers (same signature): per (row, head) the valid length is
``min(cache_lens[r, h], C_h)``, read from the head's segment.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from varkv_kernels.quant import QuantizedKV, dequantize

Store = Union[torch.Tensor, QuantizedKV]


class PackedKV(NamedTuple):
    """One layer's K or V with per-head capacities.

    store: ``[R, 1, T, D]`` tensor or :class:`QuantizedKV`, ``T = sum(capacities)``.
    offsets: ``[H + 1]`` int32 on the store's device, ``offsets[h] = Σ_{i<h} C_i`` (head ``h`` is tokens
        ``offsets[h]:offsets[h+1]``; what the Triton kernels read).
    capacities: ``(C_0, ..., C_{H-1})`` on the host (the same numbers, so no device sync is needed).
    """

    store: Store
    offsets: torch.Tensor
    capacities: tuple[int, ...]

    @property
    def heads(self) -> int:
        return len(self.capacities)

    @property
    def total(self) -> int:
        """``T``: tokens per row over all heads."""
        return int(self.store.shape[2])

    @property
    def fmt(self) -> str:
        return self.store.fmt if isinstance(self.store, QuantizedKV) else "compute"

    @property
    def head_dim(self) -> int:
        return int(self.store.shape[3])

    @property
    def rows(self) -> int:
        return int(self.store.shape[0])

    @property
    def device(self) -> torch.device:
        return (self.store.data if isinstance(self.store, QuantizedKV) else self.store).device

    def starts(self) -> tuple[int, ...]:
        """Host copy of ``offsets[:-1]``: where each head's segment starts."""
        out, acc = [], 0
        for c in self.capacities:
            out.append(acc)
            acc += c
        return tuple(out)

    def segment(self, head: int, length: int | None = None) -> Store:
        """Head ``head``'s first ``length`` tokens (default all ``C_h``) as a ``[R, 1, length, D]`` view."""
        start, cap = self.starts()[head], self.capacities[head]
        n = cap if length is None else min(int(length), cap)
        if isinstance(self.store, QuantizedKV):
            return self.store.narrow(start, n)
        return self.store[:, :, start:start + n]


def head_offsets(capacities: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``[H + 1]`` int32 prefix sums of ``capacities`` on ``device``."""
    out = [0]
    for c in capacities:
        if int(c) < 0:
            raise ValueError(f"head capacities must be >= 0, got {list(capacities)}")
        out.append(out[-1] + int(c))
    return torch.tensor(out, dtype=torch.int32, device=device)


def pack_heads(segments: Sequence[Store]) -> PackedKV:
    """A :class:`PackedKV` from per-head ``[R, C_h, D]`` tensors, or per-head ``QuantizedKV`` of shape
    ``[R, 1, C_h, D]`` (one format). Copies; for tests and tools (the engine allocates in place)."""
    if not segments:
        raise ValueError("pack_heads needs at least one head")
    if isinstance(segments[0], QuantizedKV):
        parts = [(s.data, s.scale, s.zero) for s in segments]
        zero = None if parts[0][2] is None else torch.cat([p[2] for p in parts], dim=2)
        store: Store = QuantizedKV(segments[0].fmt, torch.cat([p[0] for p in parts], dim=2),
                                   torch.cat([p[1] for p in parts], dim=2), zero, segments[0].head_dim)
        caps = tuple(int(s.scale.shape[2]) for s in segments)
        device = store.data.device
    else:
        store = torch.cat([s.unsqueeze(1) for s in segments], dim=2)
        caps = tuple(int(s.shape[1]) for s in segments)
        device = store.device
    return PackedKV(store, head_offsets(caps, device), caps)


def unpack_prefix(packed: PackedKV, lens: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``[R, H, max(lens), D]`` in ``dtype``: head ``h``'s first ``lens[h]`` tokens (dequantized), zeros
    after them. A transient copy: the PyTorch reference's way of reading a packed buffer.

    lens: per head, each ``<= C_h``.
    """
    r, h, d = packed.rows, packed.heads, packed.head_dim
    n_max = max(lens) if lens else 0
    out = torch.zeros(r, h, n_max, d, dtype=dtype, device=packed.device)
    for head, n in enumerate(lens):
        if n:
            seg = packed.segment(head, n)
            seg = dequantize(seg, dtype) if isinstance(seg, QuantizedKV) else seg.to(dtype)
            out[:, head, :n] = seg[:, 0]
    return out
