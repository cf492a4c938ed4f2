"""Procedural class-conditional 32×32 images for the built-in ``tiny`` model (no downloads).

Each class is a fixed combination of three attributes living at three spatial scales, so that a
next-scale model has to use every scale to get the class right:

- **layout** (coarse, scales 1–2): the direction of the two-colour background gradient —
  horizontal, vertical, diagonal or radial;
- **shape** (mid, scales 3–5): disc, square, triangle, ring or cross;
- **texture** (fine, scales 6–8): solid, 8 px stripes or an 8 px checkerboard in two colours.
  Bands are 8 px wide because a ×4 tokenizer at this size was measured to keep 10 px stripes and
  lose 5 px ones (experiments/tiny/README.md).

Every attribute value is shared by at least two classes and any two attributes identify the class,
so no single attribute does. Colours, position, size, stripe orientation and phase are random per
image. A small **companion disc** sits on the opposite side of the image centre in the shape's
primary colour: a long-range dependency (its colour and place are fixed by an object far away),
so fine scales depending on early-scale context matter for the cache experiments.

Images are float32 ``[N, 3, 32, 32]`` in ``[-1, 1]`` (the VQ-VAE's input range). Everything is
vectorized torch on CPU and deterministic for a given ``(labels, seed)``.
"""
from __future__ import annotations

import math

import torch

from tuner.data.shapes import SHAPES, shape_sdf

RESOLUTION = 32
LAYOUTS = ("horizontal", "vertical", "diagonal", "radial")
TEXTURES = ("solid", "stripes", "checker")
BAND = 8.0  # stripe / checker band width in pixels (period 16)

# (layout, shape, texture) per class. Each shape appears twice, its two classes differing in both
# layout and texture; every (layout, texture) pair is unique as well.
CLASSES: tuple[tuple[str, str, str], ...] = (
    ("horizontal", "disc", "solid"),
    ("vertical", "disc", "stripes"),
    ("diagonal", "square", "checker"),
    ("radial", "square", "solid"),
    ("horizontal", "triangle", "stripes"),
    ("diagonal", "triangle", "solid"),
    ("vertical", "ring", "checker"),
    ("radial", "ring", "stripes"),
    ("horizontal", "cross", "checker"),
    ("diagonal", "cross", "stripes"),
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(f"{lay}-{shp}-{tex}" for lay, shp, tex in CLASSES)

_CHUNK = 2048  # images rendered at once: bounds peak memory to a few hundred MB


def _class_table() -> torch.Tensor:
    """``[NUM_CLASSES, 3]`` long: layout, shape and texture index per class."""
    return torch.tensor([[LAYOUTS.index(a), SHAPES.index(b), TEXTURES.index(c)] for a, b, c in CLASSES])


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorized HSV → RGB. ``h, s, v``: ``[N]`` in [0, 1] (h wraps). Returns ``[N, 3]``."""
    k = torch.tensor([5.0, 3.0, 1.0])
    kk = (k[None, :] + h[:, None] * 6.0) % 6.0
    ramp = torch.minimum(kk, 4.0 - kk).clamp(0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def _draw_params(n: int, seed: int) -> dict[str, torch.Tensor]:
    """All per-image random choices, drawn in one fixed order from one generator."""
    g = torch.Generator().manual_seed(int(seed))

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def bit() -> torch.Tensor:
        return torch.randint(0, 2, (n,), generator=g)

    p: dict[str, torch.Tensor] = {}
    # Background: a brighter and a darker colour with clearly different hues, so the gradient reads.
    hue_bg = u(0.0, 1.0)
    p["bg0"] = _hsv_to_rgb(hue_bg, u(0.35, 0.75), u(0.4, 0.6))
    p["bg1"] = _hsv_to_rgb(hue_bg + u(0.25, 0.75), u(0.35, 0.75), u(0.05, 0.2))
    p["flip"] = bit()  # which end of the gradient is bright
    p["diag"] = bit()  # which diagonal, for the diagonal layout
    # Object colours are bright (value >= 0.8) so the silhouette stands out on the dark background;
    # the texture's second colour is roughly complementary.
    hue_obj = u(0.0, 1.0)
    p["fg0"] = _hsv_to_rgb(hue_obj, u(0.65, 1.0), u(0.8, 1.0))
    p["fg1"] = _hsv_to_rgb(hue_obj + 0.5 + u(-0.08, 0.08), u(0.65, 1.0), u(0.8, 1.0))
    # Geometry: object off-centre towards a random diagonal, companion mirrored through the centre.
    p["radius"] = u(7.5, 10.0)
    quadrant = torch.randint(0, 4, (n,), generator=g).float()
    p["angle"] = (math.pi / 4) + (math.pi / 2) * quadrant + u(-math.pi / 9, math.pi / 9)
    p["offset"] = u(2.5, 4.0)
    p["comp_radius"] = u(2.75, 3.5)
    p["stripe_vertical"] = bit()
    p["phase_x"] = u(0.0, 2 * BAND)
    p["phase_y"] = u(0.0, 2 * BAND)
    return p


def _band(coord: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Anti-aliased square wave: 1 inside bands ``[0, BAND)`` of period ``2·BAND``, else 0."""
    u = (coord + phase) % (2 * BAND)
    inside = torch.minimum(u, BAND - u)  # distance into the band (negative outside it)
    outside = -torch.minimum(u - BAND, 2 * BAND - u)
    signed = torch.where(u < BAND, inside, outside)
    return (0.5 + signed).clamp(0.0, 1.0)


def object_centre(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Object centre ``(x, y)`` in pixels, each ``[B]``, from drawn parameters ``p``."""
    centre = RESOLUTION / 2
    return centre + p["offset"] * torch.cos(p["angle"]), centre + p["offset"] * torch.sin(p["angle"])


def companion_centre(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Companion centre ``(x, y)``, each ``[B]``: mirrored through the image centre, beyond the object's reach
    (every shape stays within 1.2·radius), then kept inside the frame."""
    centre = RESOLUTION / 2
    dist = 1.2 * p["radius"] + p["comp_radius"] + 2.0 - p["offset"]
    lo, hi = p["comp_radius"] + 0.5, RESOLUTION - p["comp_radius"] - 0.5
    x = (centre - dist * torch.cos(p["angle"])).clamp(lo, hi)
    y = (centre - dist * torch.sin(p["angle"])).clamp(lo, hi)
    return x, y


def _render(labels: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Render one chunk: ``labels [B]``, ``p`` sliced to the chunk. Returns ``[B, 3, 32, 32]`` in [0, 1]."""
    b = labels.shape[0]
    attrs = _class_table()[labels]
    layout, shape, texture = attrs[:, 0], attrs[:, 1], attrs[:, 2]
    ax = torch.arange(RESOLUTION, dtype=torch.float32) + 0.5  # pixel centres
    y, x = ax[None, :, None], ax[None, None, :]  # [1, H, 1], [1, 1, W]
    centre = RESOLUTION / 2

    def col(v: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, 1] for broadcasting against pixels
        return v.view(b, 1, 1)

    # Background gradient position t in [0, 1] for each layout.
    diag_sign = col(p["diag"].float() * 2 - 1)
    t_diag = (x + diag_sign * (y - centre) + centre) / (2 * RESOLUTION)
    t_radial = torch.sqrt((x - centre) ** 2 + (y - centre) ** 2) / (centre * math.sqrt(2))
    t = (x / RESOLUTION).expand(b, RESOLUTION, RESOLUTION)
    t = torch.where(col(layout) == LAYOUTS.index("vertical"), y / RESOLUTION, t)
    t = torch.where(col(layout) == LAYOUTS.index("diagonal"), t_diag, t)
    t = torch.where(col(layout) == LAYOUTS.index("radial"), t_radial, t)
    t = torch.where(col(p["flip"]) == 1, 1 - t, t).clamp(0, 1)
    img = p["bg0"][:, :, None, None] * (1 - t[:, None]) + p["bg1"][:, :, None, None] * t[:, None]

    # Object: signed distance → 1 px anti-aliased coverage.
    cx, cy = object_centre(p)
    dx, dy = x - col(cx), y - col(cy)
    sdf = shape_sdf(shape, dx, dy, col(p["radius"]))
    cover = (0.5 - sdf).clamp(0.0, 1.0)

    # Texture: fraction of the second colour at each pixel.
    sx, sy = _band(x, col(p["phase_x"])), _band(y, col(p["phase_y"]))
    vertical = col(p["stripe_vertical"]) == 1
    stripes = torch.where(vertical, sx.expand(b, -1, RESOLUTION), sy.expand(b, RESOLUTION, -1))
    checker = sx * (1 - sy) + (1 - sx) * sy
    mix = torch.zeros(b, RESOLUTION, RESOLUTION)
    mix = torch.where(col(texture) == TEXTURES.index("stripes"), stripes, mix)
    mix = torch.where(col(texture) == TEXTURES.index("checker"), checker, mix)
    obj = p["fg0"][:, :, None, None] * (1 - mix[:, None]) + p["fg1"][:, :, None, None] * mix[:, None]
    img = img * (1 - cover[:, None]) + obj * cover[:, None]

    # Companion disc in the object's primary colour, across the image.
    ccx, ccy = companion_centre(p)
    comp = (0.5 - (torch.sqrt((x - col(ccx)) ** 2 + (y - col(ccy)) ** 2) - col(p["comp_radius"]))).clamp(0, 1)
    img = img * (1 - comp[:, None]) + p["fg0"][:, :, None, None] * comp[:, None]
    return img.clamp(0.0, 1.0)


def generate_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Render one image per label.

    Parameters
    ----------
    labels : LongTensor ``[N]``
        Class indices in ``[0, NUM_CLASSES)``.
    seed : int
        Seed of the per-image random choices; the same ``(labels, seed)`` gives the same images.

    Returns
    -------
    Tensor ``[N, 3, 32, 32]`` float32 in ``[-1, 1]``.
    """
    labels = torch.as_tensor(labels).long().cpu().flatten()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    n = labels.numel()
    params = _draw_params(n, seed)
    out = torch.empty(n, 3, RESOLUTION, RESOLUTION)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = _render(labels[sl], {k: v[sl] for k, v in params.items()})
    return out.mul_(2).sub_(1)


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced set: ``n`` images (class counts differ by at most one), shuffled.

    Returns
    -------
    images : Tensor ``[n, 3, 32, 32]`` float32 in ``[-1, 1]``
    labels : LongTensor ``[n]``
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    # Own stream for the order, so that shuffling never shifts the images' random draws.
    g = torch.Generator().manual_seed(int(seed) + 7919)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    return generate_images(labels, seed), labels


def describe() -> str:
    """Markdown description of the data set (for the model card)."""
    rows = "\n".join(f"| {i} | `{name}` | {lay} | {shp} | {tex} |"
                     for i, (name, (lay, shp, tex)) in enumerate(zip(CLASS_NAMES, CLASSES)))
    return f"""\
Procedural class-conditional images, {RESOLUTION}×{RESOLUTION} RGB, {NUM_CLASSES} classes, generated on the
fly from a seed (`tuner.data.procedural`; no downloads). Each class fixes three attributes at three spatial
scales:

- **layout** (coarse): direction of a two-colour background gradient — horizontal, vertical, diagonal or
  radial (which end is bright, and which diagonal, are random per image);
- **shape** (mid): disc, square, triangle, ring or cross, radius 7.5–10 px, centred 2.5–4 px off the image
  centre towards a random diagonal;
- **texture** (fine): solid, {BAND:.0f} px stripes (horizontal or vertical at random) or an {BAND:.0f} px
  checkerboard, in the shape's colour and a roughly complementary second colour, random phase.

Every attribute value appears in at least two classes and any two attributes identify the class, so no single
attribute does. Colours are random per image (darker background, bright object). A small **companion disc**
(radius 2.75–3.5 px) sits on the opposite side of the centre in the shape's primary colour: its colour and
position depend on an object far away, a long-range dependency across the image.

| class | name | layout | shape | texture |
|---|---|---|---|---|
{rows}
"""
