"""Signed distance functions of the procedural shapes (pixels; negative inside).

Shapes are sized by one "radius" ``r`` so that they cover comparable areas and none reaches further
than ``1.2·r`` from its centre (the procedural layout keeps the companion disc beyond that).
"""
from __future__ import annotations

import math

import torch

SHAPES = ("disc", "square", "triangle", "ring", "cross")

_SQUARE_HALF = 0.82  # half side / r: corners reach 1.16·r
_TRIANGLE_CIRCUM = 1.2  # circumradius / r of the apex-up equilateral triangle
_RING_MID, _RING_HALF = 0.75, 0.25  # ring from 0.5·r to r (thickness 0.5·r ≥ 3.75 px)
_CROSS_HALF_WIDTH = 0.32  # arm half width / r: arms ≥ 4.8 px wide


def _box(dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    # Max-of-slabs distance: exact inside and on the boundary, which is all 1 px anti-aliasing needs.
    return torch.maximum(dx.abs() - hx, dy.abs() - hy)


def shape_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance of every pixel to its image's shape.

    Parameters
    ----------
    shape : LongTensor ``[B]``
        Index into :data:`SHAPES` per image.
    dx, dy : Tensor ``[B, 1, W]`` and ``[B, H, 1]``
        Pixel offsets from the shape centre (image y grows downwards).
    r : Tensor ``[B, 1, 1]``
        Size parameter in pixels.

    Returns
    -------
    Tensor ``[B, H, W]``: distance in pixels, negative inside the shape.
    """
    dx, dy = torch.broadcast_tensors(dx, dy)
    r = r.expand_as(dx)
    out = torch.empty_like(dx)
    for index, name in enumerate(SHAPES):
        sel = shape == index
        if not bool(sel.any()):
            continue
        x, y, rr = dx[sel], dy[sel], r[sel]
        if name == "disc":
            d = torch.sqrt(x * x + y * y) - rr
        elif name == "square":
            d = _box(x, y, _SQUARE_HALF * rr, _SQUARE_HALF * rr)
        elif name == "triangle":
            # Intersection of three half-planes at the inradius (half the circumradius); apex points up (-y).
            inradius = 0.5 * _TRIANGLE_CIRCUM * rr
            s, c = math.sin(math.pi / 3), math.cos(math.pi / 3)
            d = torch.maximum(torch.maximum(y, s * x - c * y), -s * x - c * y) - inradius
        elif name == "ring":
            d = (torch.sqrt(x * x + y * y) - _RING_MID * rr).abs() - _RING_HALF * rr
        else:  # cross: union of a horizontal and a vertical arm
            w = _CROSS_HALF_WIDTH * rr
            d = torch.minimum(_box(x, y, rr, w), _box(x, y, w, rr))
        out[sel] = d
    return out
