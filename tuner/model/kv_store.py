"""One layer's persistent K or V buffer in its storage format (docs/design.md, Memory).

A buffer is either a plain ``[R, H, C, D]`` tensor in the run's compute dtype (format ``compute``)
or a :class:`varkv_kernels.quant.QuantizedKV` (``int8`` / ``int4`` plus fp16 scales). Under per-head
budgets a layer's buffer is a :class:`varkv_kernels.packed.PackedKV`: the same two kinds as a
``[R, 1, Σ_h C_h, D]`` store with the heads' segments back to back (``*_heads`` functions below).
:class:`~tuner.model.cache.KVCache` only talks to its buffers through these functions, so the
compaction logic is written once for every format. Tokens are quantized when a layer writes what
it keeps and never again: a kept token's codes and scales move together when the buffer is
compacted, so the error does not grow with the number of scales a token survives.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar, Union

import torch

from varkv_kernels.packed import PackedKV, head_offsets, unpack_prefix
from varkv_kernels.quant import QuantizedKV, empty_quantized, quantize, write_tokens

Buffer = Union[torch.Tensor, QuantizedKV, PackedKV]
F = TypeVar("F", bound=Callable)


def _exact(fn: F) -> F:
    """Run ``fn`` outside autocast: the engine runs fp16/bf16 under autocast, which refuses integer
    tensors in ops like ``cat`` and would round the fp32 (de)quantization math."""

    @functools.wraps(fn)
    def wrapper(buf, *args, **kwargs):
        device = (buf.data if isinstance(buf, QuantizedKV) else buf).device.type
        with torch.autocast(device_type=device, enabled=False):
            return fn(buf, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def allocate(fmt: str, rows: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
             device: torch.device | str) -> Buffer:
    """An uninitialised buffer of ``capacity`` tokens in ``fmt``."""
    if fmt == "compute":
        return torch.empty(rows, heads, capacity, head_dim, dtype=dtype, device=device)
    return empty_quantized(fmt, rows, heads, capacity, head_dim, device)


def allocate_heads(fmt: str, rows: int, capacities: tuple[int, ...], head_dim: int, dtype: torch.dtype,
                   device: torch.device | str, offsets: torch.Tensor | None = None) -> PackedKV:
    """An uninitialised packed buffer: head ``h`` holds ``capacities[h]`` tokens, no padding.

    offsets: the ``[H + 1]`` head offsets to share (K and V of a layer hold one tensor), else new.
    """
    store = allocate(fmt, rows, 1, sum(capacities), head_dim, dtype, device)
    offs = head_offsets(capacities, device) if offsets is None else offsets
    return PackedKV(store, offs, tuple(int(c) for c in capacities))


def nbytes(buf: Buffer) -> int:
    """Bytes the buffer holds (data plus every scale and zero point; a packed buffer's offsets are
    index metadata, not K/V)."""
    if isinstance(buf, PackedKV):
        return nbytes(buf.store)
    if isinstance(buf, QuantizedKV):
        return buf.nbytes
    return buf.numel() * buf.element_size()


@_exact
def read(buf: Buffer, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``0:length`` as ``[R, H, length, D]`` in ``dtype`` (a view for ``compute``, else a
    dequantized copy)."""
    if isinstance(buf, QuantizedKV):
        from varkv_kernels.quant import dequantize

        return dequantize(buf.narrow(0, length), dtype)
    return buf[:, :, :length]


@_exact
def write(buf: Buffer, start: int, x: torch.Tensor) -> None:
    """Store ``x`` ``[R, H, n, D]`` at tokens ``start:start+n`` (quantizing it for int formats)."""
    if isinstance(buf, QuantizedKV):
        write_tokens(buf, start, x)
    else:
        buf[:, :, start:start + x.shape[2]].copy_(x)


def _parts(buf: Buffer) -> list[torch.Tensor]:
    """The tensors that make up a buffer, each with tokens on dim 2."""
    if isinstance(buf, QuantizedKV):
        return [buf.data, buf.scale] + ([buf.zero] if buf.zero is not None else [])
    return [buf]


@_exact
def compact_shared(buf: Buffer, old: torch.Tensor, new_x: torch.Tensor) -> None:
    """Keep the same tokens in every row and head: ``buf[:, :, :k] = [buf[old] ; new_x]``.

    old: ``[n_old]`` sorted indices of surviving kept tokens. new_x: ``[R, H, n_new, D]`` the chosen
    new tokens in the compute dtype (quantized here when the buffer is).
    """
    n_old = old.numel()
    if n_old:
        for part in _parts(buf):
            part[:, :, :n_old] = part[:, :, old]
    write(buf, n_old, new_x)


@_exact
def compact_per_head(buf: Buffer, length: int, new_x: torch.Tensor, idx: torch.Tensor) -> None:
    """Each (row, head) keeps its own candidates: ``buf[r, h, :k] = cand[r, h, idx[r, h]]`` where the
    candidates are the ``length`` kept tokens followed by ``new_x`` ``[R, H, n_new, D]``.

    idx: ``[R, H, k]`` int64 sorted indices into the candidates. The candidates are a transient copy.
    """
    k = idx.shape[-1]
    new = quantize(new_x, buf.fmt) if isinstance(buf, QuantizedKV) else new_x
    for part, new_part in zip(_parts(buf), _parts(new)):
        cand = torch.cat((part[:, :, :length], new_part), dim=2)
        if part.dim() == 4:
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, part.shape[-1])
        else:
            gather = idx
        part[:, :, :k] = cand.gather(2, gather)


# ------------------------------------------------------------------------ packed per-head buffers
@_exact
def read_heads(buf: PackedKV, lens: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``[R, H, max(lens), D]`` in ``dtype``: head ``h``'s first ``lens[h]`` tokens, zeros after them
    (a copy, dequantized for int formats)."""
    return unpack_prefix(buf, lens, dtype)


def head_moves(buf: PackedKV, old_lens: tuple[int, ...], n_new: int, idx: torch.Tensor,
               keep: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept token comes from and goes to when a packed layer is compacted.

    The *pool* of a row is its ``T`` stored tokens followed by the scale's ``H × n_new`` new ones
    (head-major). idx: ``[R, H, k_max]`` per-head candidate indices (head ``h``: ``< old_lens[h]`` an
    old token, else new token ``idx - old_lens[h]``), the first ``keep[h]`` of each row used.
    Returns ``(src [R, K], dst [K])`` with ``K = Σ_h keep[h]``: pool index and store index of each
    kept token, head by head in order. Computed once and applied to K, V and the positions alike.
    """
    h, dev, k_max = len(keep), idx.device, idx.shape[-1]
    starts = torch.tensor(buf.starts(), dtype=torch.int64, device=dev).view(1, h, 1)
    old = torch.tensor(old_lens, dtype=torch.int64, device=dev).view(1, h, 1)
    head = torch.arange(h, dtype=torch.int64, device=dev).view(1, h, 1)
    src_all = torch.where(idx < old, starts + idx, buf.total + head * n_new + (idx - old))
    slot = torch.arange(k_max, dtype=torch.int64, device=dev)
    used = slot.view(1, -1) < torch.tensor(keep, dtype=torch.int64, device=dev).view(-1, 1)  # [H, k_max]
    return src_all[:, used], (starts.view(h, 1) + slot.view(1, -1))[used]


@_exact
def compact_heads(buf: PackedKV, new_x: torch.Tensor, moves: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Apply :func:`head_moves` to ``buf``: ``store[dst] = pool[src]`` per row, where the pool is the
    stored tokens followed by ``new_x`` ``[R, H, n_new, D]`` (quantized here once when the buffer is;
    ``[R, H, n_new]`` for a packed id buffer). The pool is a transient copy, so a token may move onto
    a slot another token leaves."""
    src, dst = moves
    r, h, n = new_x.shape[:3]
    new = quantize(new_x, buf.fmt) if buf.fmt != "compute" else new_x
    for part, new_part in zip(_parts(buf.store), _parts(new)):
        flat = part[:, 0]  # [R, T, ...]: a view, written in place
        pool = torch.cat((flat, new_part.reshape(r, h * n, *new_part.shape[3:])), dim=1)
        gather = src if flat.dim() == 2 else src.unsqueeze(-1).expand(-1, -1, flat.shape[-1])
        flat[:, dst] = pool.gather(1, gather)
