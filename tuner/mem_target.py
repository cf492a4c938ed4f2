"""Memory targets as users write them: ``15%``, ``0.15`` (of the full cache) or ``40MiB`` (KV bytes per
image).

:class:`MemTarget` is the one type the search, preset fitting (``tuner presets --mem-target``) and
``tuner policy check`` read targets through; :func:`parse_size` is also the grammar of
``tuner plan --gpu-mem``. Parse errors are one-line :class:`~tuner.errors.UserError` messages.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tuner.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"40MiB"`` → 41943040; units B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (of 1024)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{text!r} is not a size; write a number with a unit, e.g. 40MiB, 1.5GB or 800kB")
    value = round(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"size {text!r} must be positive, e.g. 40MiB")
    return value


@dataclass(frozen=True)
class MemTarget:
    """A memory target: a fraction of the full cache, or absolute KV bytes per image (exactly one).

    ``text`` is how the user wrote it (kept for study names and provenance). The search, preset
    fitting and ``tuner policy check`` all read targets through this one type.
    """

    fraction: float | None = None
    bytes_per_image: int | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.bytes_per_image is None):
            raise ValueError("a memory target is either a fraction or a byte count")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"memory target fraction {self.fraction} must be in (0, 1]")
        if self.bytes_per_image is not None and self.bytes_per_image <= 0:
            raise ValueError(f"memory target {self.bytes_per_image} bytes must be positive")

    def fits(self, fraction: float, kv_bytes_per_image: float) -> bool:
        """Whether a plan's memory is within the target: the same rule the search's constraint applies."""
        return self.violation(fraction, kv_bytes_per_image) <= 0.0

    def violation(self, fraction: float, kv_bytes_per_image: float) -> float:
        """Constraint value (<= 0 feasible), relative to the target so units do not matter."""
        if self.fraction is not None:
            return fraction / self.fraction - 1.0
        return kv_bytes_per_image / float(self.bytes_per_image) - 1.0

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:.4g} of the full cache"
        return f"{self.bytes_per_image / 2**20:.4g} MiB per image"


def parse_mem_target(text: str, flag: str = "--mem-target") -> MemTarget:
    """``"15%"`` or ``"0.15"`` (of the full cache) or ``"40MiB"`` (KV bytes per image).

    Errors are one-line ``UserError`` messages that start with ``flag`` and the text given.
    """
    s = str(text).strip()
    where = f"{flag} {text!r}"
    hint = "use a percentage like 15%, a fraction like 0.15 or bytes per image like 40MiB"
    if s.endswith("%"):
        try:
            frac = float(s[:-1]) / 100
        except ValueError:
            raise UserError(f"{where} is not a percentage; {hint}") from None
    elif re.fullmatch(r"[0-9.eE+-]+", s or "x"):
        try:
            frac = float(s)
        except ValueError:
            raise UserError(f"{where} is not a number; {hint}") from None
        if frac > 1:
            raise UserError(f"{where} is more than the full cache; a fraction must be in (0, 1] "
                            f"(for a size add a unit, e.g. {s}MiB)")
    else:
        try:
            return MemTarget(bytes_per_image=parse_size(s), text=str(text).strip())
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if not (math.isfinite(frac) and 0 < frac <= 1):
        raise UserError(f"{where} is outside (0%, 100%]; {hint}")
    return MemTarget(fraction=frac, text=str(text).strip())
