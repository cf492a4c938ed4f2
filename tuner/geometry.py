"""The scale geometry of a next-scale model's KV cache, below the engine and the policies alike.

One type, :class:`CacheGeometry` (layers × heads × head_dim over the scale schedule), and the two
functions it is made of: the model's config (:class:`tuner.model.config.VARConfig`) and every
policy read the same token counts from here, so they cannot drift apart. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def scale_lengths_of(patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    """Tokens per scale, ``pn**2``: a ``[num_scales]`` tuple."""
    return tuple(p * p for p in patch_nums)


def scale_spans_of(patch_nums: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(begin, end)`` global token positions of each scale: ``num_scales`` half-open ranges."""
    out, cur = [], 0
    for n in scale_lengths_of(patch_nums):
        out.append((cur, cur + n))
        cur += n
    return tuple(out)


@dataclass(frozen=True)
class CacheGeometry:
    """Shape facts of a model's KV cache: layers × heads × head_dim over the scale schedule."""

    num_layers: int
    num_heads: int
    head_dim: int
    patch_nums: tuple[int, ...]

    @classmethod
    def from_var_config(cls, cfg: Any) -> "CacheGeometry":
        """Build from a :class:`tuner.model.config.VARConfig`."""
        return cls(cfg.depth, cfg.num_heads, cfg.head_dim, tuple(cfg.patch_nums))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def scale_lengths(self) -> tuple[int, ...]:
        return scale_lengths_of(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(self.scale_lengths)

    @property
    def scale_starts(self) -> tuple[int, ...]:
        """Global position of the first token of each scale."""
        return tuple(begin for begin, _ in scale_spans_of(self.patch_nums))

    def tokens_through(self, scale: int) -> int:
        """Number of tokens in scales ``0..scale`` inclusive (0 for ``scale < 0``)."""
        return sum(self.scale_lengths[: scale + 1]) if scale >= 0 else 0
