"""Comparison grids (tuner/image_grid.py): layout, difference column, shrinking and enlarging, the PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner.image_grid import (CELL, DIFF_GAIN, GridLayout, comparison_columns, comparison_grid, difference,
                              enlarge_factor, save_grid_png, write_comparison_png)
from tuner.images import to_uint8


def images(n: int, side: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_layout_size_and_boxes():
    layout = GridLayout(rows=4, cell=128, pad=2)
    assert layout.size == (4 * 130 + 2, 3 * 130 + 2)
    assert layout.box(0, 0) == (2, 2, 130, 130)
    assert layout.box(3, 2) == (2 + 3 * 130, 2 + 2 * 130, 2 + 3 * 130 + 128, 2 + 2 * 130 + 128)


def test_difference_is_amplified_clipped_and_zero_for_equal_images():
    a, b = images(2, 8, 0), images(2, 8, 1)
    d = difference(a, b)
    assert torch.equal(d, ((b - a).abs() * DIFF_GAIN).clamp(0, 1))
    assert float(d.max()) <= 1.0 and float(d.min()) >= 0.0
    assert torch.count_nonzero(difference(a, a.clone())) == 0


def test_small_images_are_enlarged_pixel_for_pixel():
    full, policy = images(3, 32, 0), images(3, 32, 1)
    cols = comparison_columns(full, policy)
    assert cols.shape == (3, 3, 3, 32, 32)  # not shrunk: 32 <= CELL
    grid, layout = comparison_grid(cols)
    k = enlarge_factor(32, CELL)
    assert k == 4 and layout.cell == 128 and tuple(grid.shape[1:]) == layout.size
    for row in range(3):
        for col, expected in enumerate((full[row], policy[row], difference(full, policy)[row])):
            top, left, bottom, right = layout.box(row, col)
            cell = grid[:, top:bottom, left:right]
            assert torch.equal(cell, expected.repeat_interleave(k, 1).repeat_interleave(k, 2))
    assert torch.all(grid[:, :layout.pad, :] == 1)  # white padding


def test_large_images_are_shrunk_after_the_difference():
    full = images(2, 256, 0)
    policy = full.clone()
    policy[:, :, ::2, ::2] += 0.01  # a fine pattern: averaging first would hide most of it
    cols = comparison_columns(full, policy)
    assert cols.shape == (2, 3, 3, CELL, CELL)
    expected = torch.nn.functional.avg_pool2d(difference(full, policy), 2)
    assert torch.allclose(cols[:, 2], expected, atol=1e-6)
    grid, layout = comparison_grid(cols)
    assert layout.cell == CELL and tuple(grid.shape[1:]) == GridLayout(2, CELL).size


def test_png_holds_the_grid_values(tmp_path):
    from PIL import Image

    full, policy = images(4, 16, 3), images(4, 16, 4)
    path, layout = write_comparison_png(full, policy, tmp_path / "g.png")
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape == (*layout.size, 3)
    grid, _ = comparison_grid(comparison_columns(full, policy))
    assert np.array_equal(arr, to_uint8(grid[None])[0])
    save_grid_png(grid, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes() == path.read_bytes()


def test_mismatched_images_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        comparison_columns(images(2, 8, 0), images(3, 8, 0))
    with pytest.raises(ValueError, match=r"\[N, 3, 3, h, w\]"):
        comparison_grid(torch.zeros(2, 2, 3, 8, 8))
