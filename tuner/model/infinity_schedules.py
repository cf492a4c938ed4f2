"""Infinity's scale schedules: the token map of every scale, per aspect ratio and pixel count.

Data from the official code (FoundationVision/Infinity @4c27bbb, ``infinity/utils/dynamic_resolution.py``,
MIT): ``ratio2hws`` lists 13 ``(h, w)`` token maps per aspect ratio ``h/w`` (the 1024² "1M" schedule
at 1:1); each ratio ``r != 1`` also exists transposed at ``int(1/r·1000)/1000``; a pixel count takes
the first 7, 10, 12 or 13 scales ("0.06M", "0.25M", "0.60M", "1M"). A token covers 16×16 pixels
(``vae_stride``), so the image is ``16·h × 16·w``. The time axis of the official ``(t, h, w)``
triples is 1 for images and is left out here.

1:1 at "1M": sides 1 2 4 6 8 12 16 20 24 32 40 48 64, 10,521 tokens, 6,425 before the last scale;
2:1 at "1M": 1x1 2x2 4x2 6x3 10x5 16x8 22x11 30x15 38x19 46x23 60x30 74x37 90x45 (h x w), 11,269
tokens, 7,219 before the last scale (a 1440 × 720 image); 1:2 is its transpose.
Users name a ratio as ``H:W`` (:data:`ASPECT_NAMES`, e.g. ``2:1`` for the official ``h_div_w`` 2.0,
``4:3`` for 1.333, ``2:3`` for 0.666). Nothing here imports torch.
"""
from __future__ import annotations

import math

VAE_STRIDE = 16  # pixels per token side (the official ``vae_stride``)

# The official ``ratio2hws`` (h/w → 13 (h, w) token maps), ratios >= 1 only.
_RATIO_HWS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)),
}

# Scales per pixel count (the official ``dynamic_resolution_h_w`` keys and lengths).
PIXEL_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _all_ratios() -> dict[float, tuple[tuple[int, int], ...]]:
    out = dict(_RATIO_HWS)
    for ratio, hws in _RATIO_HWS.items():
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


ASPECT_RATIOS: tuple[float, ...] = tuple(sorted(_all_ratios()))  # h/w, 0.333 … 3.0 (15 ratios)

# ``H:W`` names of the ratios >= 1 (reduced fractions); the transposed ratios swap them.
_NAMES = {1.000: (1, 1), 1.250: (5, 4), 1.333: (4, 3), 1.500: (3, 2), 1.750: (7, 4), 2.000: (2, 1),
          2.500: (5, 2), 3.000: (3, 1)}


def _named_ratios() -> dict[str, float]:
    out = {}
    for ratio, (h, w) in _NAMES.items():
        out[f"{h}:{w}"] = ratio
        if ratio != 1.0:
            out[f"{w}:{h}"] = int(1 / ratio * 1000) / 1000
    return out


# ``H:W`` → the official ``h_div_w`` template, ordered by ratio (1:3 … 3:1).
ASPECT_NAMES: dict[str, float] = dict(sorted(_named_ratios().items(), key=lambda kv: kv[1]))


def aspect_ratio(text: str) -> float:
    """The official ``h_div_w`` template of an ``H:W`` ratio (``"2:1"`` → 2.0, ``"8:6"`` → 1.333).

    Raises ``ValueError`` naming the allowed ratios for anything that is not one of them.
    """
    allowed = ", ".join(ASPECT_NAMES)
    parts = str(text).strip().split(":")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text} is not H:W with whole numbers; use one of the official ratios "
                         f"{allowed}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{text} must have positive H and W; use one of the official ratios {allowed}")
    g = math.gcd(h, w)
    name = f"{h // g}:{w // g}"
    if name not in ASPECT_NAMES:
        raise ValueError(f"{text} has no official Infinity schedule; use one of the official ratios "
                         f"{allowed}")
    return ASPECT_NAMES[name]


def aspect_name(h_div_w: float) -> str:
    """``H:W`` of an official ``h_div_w`` template (2.0 → ``"2:1"``); ``ValueError`` for others."""
    for name, ratio in ASPECT_NAMES.items():
        if abs(ratio - h_div_w) < 1e-9:
            return name
    raise ValueError(f"aspect ratio {h_div_w} is not one of the official templates")


def infinity_schedule(h_div_w: float = 1.0, pixels: str = "1M") -> tuple[tuple[int, int], ...]:
    """The ``(h, w)`` token map of every scale for aspect ratio ``h_div_w`` and a pixel count.

    ``h_div_w`` must be one of :data:`ASPECT_RATIOS` (the official templates, e.g. 1.0, 2.0, 0.5,
    1.333, 0.75); ``pixels`` one of :data:`PIXEL_SCALES`. Raises ``ValueError`` otherwise.
    Returns ``num_scales`` pairs; scale ``s`` has ``h·w`` tokens.
    """
    table = _all_ratios()
    match = [r for r in table if abs(r - h_div_w) < 1e-9]
    if not match:
        raise ValueError(f"aspect ratio {h_div_w} is not one of the official templates "
                         f"{', '.join(f'{r:g}' for r in ASPECT_RATIOS)}")
    if pixels not in PIXEL_SCALES:
        raise ValueError(f"pixel count {pixels!r} is not one of {', '.join(PIXEL_SCALES)}")
    return table[match[0]][:PIXEL_SCALES[pixels]]


def aspect_of_maps(shapes) -> str:
    """``H:W`` of the official ratio whose schedule starts with the ``(h, w)`` maps ``shapes`` (the
    maps a policy file records); ``ValueError`` when no official schedule does.

    From the 4th map on, every ratio's schedule is its own. Up to 3 maps several ratios share them
    ((1,1) (2,2) (3,3): 4:5, 5:4, 4:7, 7:4); the plan is the same for all of them (only RoPE's
    normalisation differs), and 1:1 is preferred, then the first by ratio.
    """
    shapes = tuple(tuple(int(x) for x in hw) for hw in shapes)
    for name, ratio in sorted(ASPECT_NAMES.items(), key=lambda kv: kv[0] != "1:1"):
        if shapes and infinity_schedule(ratio)[:len(shapes)] == shapes:
            return name
    raise ValueError(f"token maps {shapes} are not the start of any official Infinity schedule")


def image_size(schedule: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """``(height, width)`` in pixels of the image a schedule generates (its last map × 16)."""
    h, w = schedule[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE
