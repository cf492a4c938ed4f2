"""The scale geometry of a next-scale model's KV cache, below the engine and the policies alike.

One type, :class:`CacheGeometry` (layers × heads × head_dim over the scale schedule), and the two
functions it is made of: the model's config (:class:`tuner.model.config.VARConfig`) and every
policy read the same token counts from here, so they cannot drift apart. Nothing here imports torch.

Scales are square (VAR, Infinity at 1:1: ``patch_nums[s]`` is the side, ``n_s = side²``) or, for
Infinity's other aspect ratios, ``h × w`` maps (``scale_shapes``; ``patch_nums`` then holds the
heights). A geometry whose maps are all square never carries ``scale_shapes`` (normalised to None),
so square geometries compare, hash and serialise exactly as before the field existed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Shapes = tuple[tuple[int, int], ...]


def scale_lengths_of(patch_nums: tuple[int, ...], shapes: Shapes | None = None) -> tuple[int, ...]:
    """Tokens per scale, ``h·w`` (``pn**2`` for square scales): a ``[num_scales]`` tuple."""
    if shapes is not None:
        return tuple(h * w for h, w in shapes)
    return tuple(p * p for p in patch_nums)


def scale_spans_of(patch_nums: tuple[int, ...], shapes: Shapes | None = None) -> tuple[tuple[int, int], ...]:
    """``(begin, end)`` global token positions of each scale: ``num_scales`` half-open ranges."""
    out, cur = [], 0
    for n in scale_lengths_of(patch_nums, shapes):
        out.append((cur, cur + n))
        cur += n
    return tuple(out)


def format_shapes(shapes: Shapes) -> str:
    """``"1x1 2x2 4x2"``: a schedule of ``(h, w)`` maps for messages and table headers."""
    return " ".join(f"{h}x{w}" for h, w in shapes)


@dataclass(frozen=True)
class CacheGeometry:
    """Shape facts of a model's KV cache: layers × heads × head_dim over the scale schedule.

    patch_nums: per scale the side of a square map, or the height ``h`` of an ``h × w`` map.
    scale_shapes: per scale ``(h, w)`` when some map is not square (``h == patch_nums[s]``), else
        None (set to None when every given map is square). :attr:`shapes` reads both forms.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    patch_nums: tuple[int, ...]
    scale_shapes: Shapes | None = None

    def __post_init__(self) -> None:
        if self.scale_shapes is None:
            return
        shapes = tuple((int(h), int(w)) for h, w in self.scale_shapes)
        if len(shapes) != len(self.patch_nums) or any(h != p for (h, _), p in zip(shapes, self.patch_nums)):
            raise ValueError(f"scale_shapes {format_shapes(shapes)} must give one (h, w) per scale with h = "
                             f"patch_nums {list(self.patch_nums)}")
        if min((min(s) for s in shapes), default=1) < 1:
            raise ValueError(f"scale_shapes {format_shapes(shapes)} must be positive")
        object.__setattr__(self, "scale_shapes", None if all(h == w for h, w in shapes) else shapes)

    @classmethod
    def from_var_config(cls, cfg: Any) -> "CacheGeometry":
        """Build from a :class:`tuner.model.config.VARConfig`."""
        return cls(cfg.depth, cfg.num_heads, cfg.head_dim, tuple(cfg.patch_nums))

    @classmethod
    def from_shapes(cls, num_layers: int, num_heads: int, head_dim: int, shapes: Shapes) -> "CacheGeometry":
        """Build from ``(h, w)`` per scale (square schedules give the plain ``patch_nums`` geometry)."""
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        return cls(num_layers, num_heads, head_dim, tuple(h for h, _ in shapes), shapes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheGeometry":
        """Inverse of :meth:`to_dict` (``scale_shapes`` optional: absent reads as square)."""
        shapes = d.get("scale_shapes")
        return cls(int(d["num_layers"]), int(d["num_heads"]), int(d["head_dim"]),
                   tuple(int(p) for p in d["patch_nums"]),
                   None if shapes is None else tuple((int(h), int(w)) for h, w in shapes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; ``scale_shapes`` only when some map is not square (square: as always)."""
        out: dict[str, Any] = {"num_layers": self.num_layers, "num_heads": self.num_heads,
                               "head_dim": self.head_dim, "patch_nums": list(self.patch_nums)}
        if self.scale_shapes is not None:
            out["scale_shapes"] = [list(s) for s in self.scale_shapes]
        return out

    @property
    def is_square(self) -> bool:
        return self.scale_shapes is None

    @property
    def shapes(self) -> Shapes:
        """``(h, w)`` of every scale (``(p, p)`` for square scales)."""
        return self.scale_shapes if self.scale_shapes is not None else tuple((p, p) for p in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def scale_lengths(self) -> tuple[int, ...]:
        return scale_lengths_of(self.patch_nums, self.scale_shapes)

    @property
    def seq_len(self) -> int:
        return sum(self.scale_lengths)

    @property
    def scale_starts(self) -> tuple[int, ...]:
        """Global position of the first token of each scale."""
        return tuple(begin for begin, _ in scale_spans_of(self.patch_nums, self.scale_shapes))

    def tokens_through(self, scale: int) -> int:
        """Number of tokens in scales ``0..scale`` inclusive (0 for ``scale < 0``)."""
        return sum(self.scale_lengths[: scale + 1]) if scale >= 0 else 0

    def describe_scales(self) -> str:
        """``"patch_nums [1, 2, 4]"`` (square) or ``"scales 1x1 2x2 4x2"``: for messages."""
        if self.scale_shapes is None:
            return f"patch_nums {list(self.patch_nums)}"
        return f"scales {format_shapes(self.scale_shapes)}"
