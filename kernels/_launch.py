"""Set-up shared by the Triton kernels of this package: the per-program prologue and launch flags.

Every kernel here runs one program per (row, head) pair along grid axis 0 over ``[R, H, L, D]``
tensors with a ragged valid length per pair (axis 0, because CUDA allows 2^31 - 1 blocks there but
only 65,535 on axes 1 and 2: d30's 30 heads × 2 CFG rows would cap the batch at 1,092 images), and
takes the same compile-time flags (``D``, ``BLOCK_D``, ``UPCAST``, ``IEEE``). A packed cache with
per-head capacities (:mod:`varkv_kernels.packed`) replaces the head stride by per-head offsets
(:func:`packed_row_head_span`). Both halves of that
contract live here so that :mod:`varkv_kernels.attention` and :mod:`varkv_kernels.scoring` cannot drift apart.

Importing this module defines a Triton function: ``TRITON_INTERPRET=1`` must be set before that for
the CPU interpreter (see :mod:`varkv_kernels.dispatch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256


@triton.jit
def row_head_span(pid_rh, H, LENS, N):
    """``(r, h, n_valid)`` of program ``pid_rh``: its row and head, and ``min(LENS[r, h], N)``.

    ``LENS`` is a contiguous ``[R, H]`` int32 tensor, so ``LENS + pid_rh`` is the pair's length.
    """
    # int64 row/head offsets: large batches of long caches overflow int32 element offsets.
    r = (pid_rh // H).to(tl.int64)
    h = (pid_rh % H).to(tl.int64)
    n_valid = tl.minimum(tl.load(LENS + pid_rh), N)
    return r, h, n_valid


@triton.jit
def packed_row_head_span(pid_rh, H, LENS, OFFS):
    """``(r, h, n_valid, start)`` of program ``pid_rh`` over a packed cache (:mod:`varkv_kernels.packed`).

    ``OFFS`` is the ``[H + 1]`` int32 head offsets: head ``h``'s segment is tokens
    ``OFFS[h]:OFFS[h+1]``, so ``n_valid = min(LENS[r, h], C_h)`` and ``start`` (int64) is where the
    segment begins on the token axis.
    """
    r = (pid_rh // H).to(tl.int64)
    h = (pid_rh % H).to(tl.int64)
    start = tl.load(OFFS + h)
    n_valid = tl.minimum(tl.load(LENS + pid_rh), tl.load(OFFS + h + 1) - start)
    return r, h, n_valid, start.to(tl.int64)


@dataclass(frozen=True)
class LaunchFlags:
    """The compile-time flags every kernel of this package takes, for one query tensor."""

    head_dim: int
    block_d: int
    interpreted: bool
    upcast: bool
    ieee: bool

    def constexprs(self) -> dict[str, Any]:
        """``D``, ``BLOCK_D``, ``UPCAST`` and ``IEEE`` as keyword arguments of a kernel launch."""
        return dict(D=self.head_dim, BLOCK_D=self.block_d, UPCAST=self.upcast, IEEE=self.ieee)


def launch_flags(q: torch.Tensor, interpreted: bool) -> LaunchFlags:
    """Flags for queries ``q`` of shape ``[R, H, L, D]``; raises ``ValueError`` when ``D > 256``.

    Call it before allocating outputs so the head-dim check comes first, even for empty inputs.
    """
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head_dim up to {MAX_HEAD_DIM}, got {d}; "
                         "use the torch backend")
    return LaunchFlags(
        head_dim=d,
        # tl.dot needs at least 16 along each side, and tl.arange a power of two.
        block_d=max(16, triton.next_power_of_2(d)),
        interpreted=interpreted,
        # The interpreter cannot multiply bf16 (it sees raw uint16 bit patterns).
        upcast=interpreted and q.dtype == torch.bfloat16,
        # fp32 inputs ask for fp32 accuracy, which TF32 dots would not give.
        ieee=q.dtype == torch.float32,
    )


def int32_lens(lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Valid lengths ``[R, H]`` as a contiguous int32 tensor on ``device`` (what ``LENS`` expects)."""
    return lens.to(device=device, dtype=torch.int32).contiguous()
