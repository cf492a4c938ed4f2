"""Same-seed comparison grids: full cache | policy | amplified absolute difference, one row per class.

Pure image composition (no tracking library, no model): the search's MLflow logging
(:mod:`tuner.search.grids`) and anyone else turn ``[N, 3, H, W]`` images in [0, 1] into one small,
text-free PNG. Two steps, so a worker can shrink large images before sending them to the driver:

1. :func:`comparison_columns` ``(full, policy)`` → ``[N, 3, 3, h, w]``: per row the full-cache image,
   the policy's and ``clip(gain × |policy − full|, 0, 1)``, the difference taken at the images' own
   resolution, then all three shrunk (area average) to at most ``max_side`` pixels a side.
2. :func:`comparison_grid` ``(columns, cell)`` → ``[3, H', W']``: each cell enlarged by an integer
   nearest-neighbour factor up to ``cell`` pixels (tiny's 32-px images become 128 px, every pixel a
   4×4 block, so the values are those of the images), tiled with white padding
   (:class:`GridLayout`).

torch and PIL are imported inside the functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ("full cache", "policy", "difference")  # left to right
DIFF_GAIN = 4.0  # the difference column shows |policy - full| x 4, clipped to [0, 1]
CELL = 128  # target cell side in pixels: small images are enlarged to it, large ones shrunk to it
PAD = 2  # white pixels between and around the cells


@dataclass(frozen=True)
class GridLayout:
    """Where cell ``(row, col)`` sits in a grid of ``rows`` × 3 square cells of ``cell`` pixels."""

    rows: int
    cell: int
    pad: int = PAD
    cols: int = len(COLUMNS)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the grid image in pixels."""
        return (self.rows * (self.cell + self.pad) + self.pad, self.cols * (self.cell + self.pad) + self.pad)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` pixel bounds (bottom and right exclusive) of one cell."""
        top, left = self.pad + row * (self.cell + self.pad), self.pad + col * (self.cell + self.pad)
        return top, left, top + self.cell, left + self.cell


def difference(full: Any, policy: Any, gain: float = DIFF_GAIN) -> Any:
    """``clip(gain × |policy − full|, 0, 1)``, ``[N, 3, H, W]`` float32 (0 where they are equal)."""
    return (policy.float() - full.float()).abs().mul(gain).clamp(0, 1)


def shrink(images: Any, max_side: int) -> Any:
    """``[N, 3, H, W]`` shrunk by area averaging so that ``max(H, W) <= max_side`` (aspect kept);
    unchanged (the same tensor) when already that small."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if max(h, w) <= max_side:
        return images
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images.float(), size=size, mode="area")


def comparison_columns(full: Any, policy: Any, *, gain: float = DIFF_GAIN, max_side: int = CELL) -> Any:
    """``full``, ``policy``: ``[N, 3, H, W]`` in [0, 1], the same classes and seeds, row for row.

    Returns ``[N, 3 (columns: full | policy | difference), 3 (RGB), h, w]`` float32, ``h, w <=
    max_side`` (shrunk after the difference is taken, so small differences still show).
    """
    import torch

    if full.shape != policy.shape or full.dim() != 4 or full.shape[1] != 3:
        raise ValueError(f"full {tuple(full.shape)} and policy {tuple(policy.shape)} must both be "
                         f"[N, 3, H, W]")
    cols = [full.float(), policy.float(), difference(full, policy, gain)]
    return torch.stack([shrink(c, max_side) for c in cols], dim=1).float()


def enlarge_factor(side: int, cell: int) -> int:
    """The integer nearest-neighbour factor that brings ``side`` pixels closest to ``cell`` from below
    (at least 1)."""
    return max(1, cell // max(1, side))


def comparison_grid(columns: Any, cell: int = CELL, pad: int = PAD) -> tuple[Any, GridLayout]:
    """``columns`` ``[N, 3, 3, h, w]`` (:func:`comparison_columns`) → ``([3, H', W']`` grid in [0, 1],
    its :class:`GridLayout`). Cells are ``h × k`` pixels with ``k = enlarge_factor(max(h, w), cell)``;
    non-square images are placed top-left in a square cell."""
    import torch

    if columns.dim() != 5 or columns.shape[1] != len(COLUMNS) or columns.shape[2] != 3:
        raise ValueError(f"columns {tuple(columns.shape)} must be [N, 3, 3, h, w]")
    n, _, _, h, w = columns.shape
    k = enlarge_factor(max(h, w), cell)
    side = max(h, w) * k
    cells = columns.reshape(n * len(COLUMNS), 3, h, w).clamp(0, 1)
    if k > 1:
        cells = cells.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    layout = GridLayout(rows=n, cell=side, pad=pad)
    height, width = layout.size
    grid = torch.ones(3, height, width)
    for i in range(n * len(COLUMNS)):
        top, left, _, _ = layout.box(*divmod(i, len(COLUMNS)))
        grid[:, top:top + h * k, left:left + w * k] = cells[i]
    return grid, layout


def save_grid_png(grid: Any, path: str | Path) -> Path:
    """Write a ``[3, H, W]`` grid in [0, 1] as an 8-bit RGB PNG (values rounded as
    :func:`tuner.images.to_uint8` does); returns the path."""
    from PIL import Image

    from tuner.images import to_uint8

    path = Path(path)
    Image.fromarray(to_uint8(grid[None])[0]).save(path, optimize=True)
    return path


def write_comparison_png(full: Any, policy: Any, path: str | Path, *, cell: int = CELL,
                         gain: float = DIFF_GAIN) -> tuple[Path, GridLayout]:
    """:func:`comparison_columns` then :func:`comparison_grid` then :func:`save_grid_png`, in one call."""
    grid, layout = comparison_grid(comparison_columns(full, policy, gain=gain, max_side=cell), cell)
    return save_grid_png(grid, path), layout
