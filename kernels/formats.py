"""The KV storage formats by name and their exact cost in bytes (no torch: the planner and the policy
contract read it without loading the kernels). The arithmetic of each format is in :mod:`varkv_kernels.quant`.
"""
from __future__ import annotations

from dataclasses import dataclass

KV_FORMATS = ("compute", "int8", "int4")
REFERENCE_BITS = 16  # what an unquantized element counts in memory fractions


@dataclass(frozen=True)
class FormatInfo:
    """Storage cost of one format: ``bits`` per element plus ``side_values`` fp16 numbers per vector."""

    name: str
    bits: int | None  # None: the compute dtype
    side_values: int

    def vector_bytes(self, head_dim: int, compute_bytes: int = 2) -> int:
        """Bytes of one stored vector of ``head_dim`` elements (``compute_bytes`` per unquantized element)."""
        if self.bits is None:
            return head_dim * compute_bytes
        return head_dim * self.bits // 8 + self.side_values * 2


FORMATS = {
    "compute": FormatInfo("compute", None, 0),
    "int8": FormatInfo("int8", 8, 1),
    "int4": FormatInfo("int4", 4, 2),
}


def format_info(name: str) -> FormatInfo:
    """The :class:`FormatInfo` of ``name``; ``ValueError`` naming the known formats otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown KV format {name!r}; use one of {', '.join(KV_FORMATS)}") from None
