"""One layer's persistent K or V buffer in its storage format (docs/design.md, Memory).

A buffer is either a plain ``[R, H, C, D]`` tensor in the run's compute dtype (format ``compute``)
or a :class:`kernels.quant.QuantizedKV` (``int8`` / ``int4`` plus fp16 scales). :class:`~tuner.model.
cache.KVCache` only talks to its buffers through these functions, so the compaction logic is written
once for every format. Tokens are quantized when a layer writes what it keeps and never again: a kept
token's codes and scales move together when the buffer is compacted, so the error does not grow
with the number of scales a token survives.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar, Union

import torch

from kernels.quant import QuantizedKV, empty_quantized, quantize, write_tokens

Buffer = Union[torch.Tensor, QuantizedKV]
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


def nbytes(buf: Buffer) -> int:
    """Bytes the buffer holds (data plus every scale and zero point)."""
    if isinstance(buf, QuantizedKV):
        return buf.nbytes
    return buf.numel() * buf.element_size()


@_exact
def read(buf: Buffer, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``0:length`` as ``[R, H, length, D]`` in ``dtype`` (a view for ``compute``, else a
    dequantized copy)."""
    if isinstance(buf, QuantizedKV):
        from kernels.quant import dequantize

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
