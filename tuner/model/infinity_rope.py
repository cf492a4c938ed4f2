"""Infinity's 2-D rotary position embedding of self-attention queries and keys.

Facts from the official code (FoundationVision/Infinity @4c27bbb, ``infinity/models/basic.py``:
``precompute_rope2d_freqs_grid`` and ``apply_rotary_emb``, MIT), with the official inference flags
``rope2d_each_sa_layer=1``, ``rope2d_normalized_by_hw=2``:

- the head's ``head_dim/2`` feature pairs are split in two halves: the first rotated by the token's
  row, the second by its column, each with ``inv_freq = 1 / 10000^(2i / (head_dim/2))``
  (``head_dim/4`` frequencies); pairs are interleaved, ``(x[2j], x[2j+1])``;
- a token's row/column is not its index in its own scale: positions are spread over the *last scale
  of the 1024² ("1M") schedule* of the aspect ratio, ``round(i · H_last / h)`` (torch's
  half-to-even rounding), so every scale covers the same frequency range (64×64 at 1:1);
- the angles are those of a 128 × 128 grid (``2048 // 16`` rows and columns), evaluated on the CPU in
  float32 and then picked by position; the rotation runs in float32 (autocast off).

The table is evaluated over the same grid layout as the official one on purpose: a vectorised
``cos``/``sin`` and its scalar tail can differ in the last bit, so a table of another shape could
round a few angles differently.
"""
from __future__ import annotations

import torch

ROPE_BASE = 10000.0
ROPE_GRID = 2048 // 16  # rows and columns of the official angle grid (max_height, max_width)


def rope_positions(h: int, w: int, last_hw: tuple[int, int]) -> torch.Tensor:
    """``[h·w, 2]`` int64 (row, column) grid positions of a ``h × w`` scale, spread over ``last_hw``.

    The float32 product ``arange(h) · (H_last / h)`` rounded half-to-even, as the official
    ``rope2d_normalized_by_hw == 2`` branch computes it (row-major over the scale's tokens).
    """
    uph, upw = last_hw
    rows = (torch.arange(h) * (uph / h)).round().long()
    cols = (torch.arange(w) * (upw / w)).round().long()
    return torch.stack((rows.view(h, 1).expand(h, w), cols.view(1, w).expand(h, w)), dim=-1).reshape(-1, 2)


def _angle_grid(head_dim: int) -> torch.Tensor:
    """``[2, G, G, head_dim/2]`` cos/sin of every (row, column) of the grid: rows' angles in the first
    ``head_dim/4`` columns, columns' after them (float32, CPU)."""
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(ROPE_GRID, dtype=torch.int64).float()
    along = t.view(-1, 1) * inv_freq  # [G, head_dim/4]: position × frequency, one float32 product each
    grid = torch.cat((along.view(ROPE_GRID, 1, -1).expand(-1, ROPE_GRID, -1),
                      along.view(1, ROPE_GRID, -1).expand(ROPE_GRID, -1, -1)), dim=-1)
    return torch.stack((grid.cos(), grid.sin()))


def rope_table(head_dim: int, schedule: tuple[tuple[int, int], ...], last_hw: tuple[int, int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Cos/sin of every token's angles over a whole schedule: ``[2, L, head_dim // 2]`` float32.

    ``schedule``: ``(h, w)`` per scale (``L = Σ h·w``, scales in order, a prefix of the ratio's 1M
    schedule); ``last_hw``: that 1M schedule's last map. Index 0 holds cos, 1 sin; column ``j`` is the
    angle of feature pair ``j``. Raises ``ValueError`` for a head_dim not divisible by 4 or a position
    outside the grid.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    pos = torch.cat([rope_positions(h, w, last_hw) for h, w in schedule])  # [L, 2]
    if int(pos.max()) >= ROPE_GRID:
        raise ValueError(f"RoPE positions up to {int(pos.max())} exceed the official {ROPE_GRID}-wide grid")
    grid = _angle_grid(head_dim)
    return grid[:, pos[:, 0], pos[:, 1]].contiguous().to(device)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., n, head_dim]`` by ``table`` ``[2, n, head_dim // 2]`` (one scale's slice).

    Computed in float32 outside autocast (the official code turns autocast off here); returns float32.
    """
    device_type = x.device.type if x.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        cos, sin = table[0], table[1]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
        return out.reshape(x.shape)
