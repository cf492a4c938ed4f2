"""Output paths proven writable before any work, and created only after every check passed.

``check_*`` create nothing (the nearest existing ancestor must be a writable directory and no
component a regular file); :func:`writable_dir` and :func:`ensure_parent` create, and are called
last, so bad input never leaves a directory behind.
"""
from __future__ import annotations

import os
from pathlib import Path

from tuner.errors import UserError


def _nearest_existing(p: Path) -> Path:
    """``p`` or its nearest ancestor that exists (``p`` made absolute first)."""
    probe = Path(os.path.abspath(p))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _why_not_creatable(p: Path) -> str | None:
    """Why ``p`` cannot be created as a directory (its nearest existing ancestor is a file, or not
    writable), or None."""
    probe = _nearest_existing(p)
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no write permission in {probe}"
    return None


def check_writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Prove ``path`` is (or can be created as) a writable directory, creating nothing.

    The check every command runs before any expensive work; the directory itself is made only once
    every other check passed (:func:`writable_dir`), so bad input never leaves one behind.
    """
    p = Path(path)
    if not str(path).strip():
        raise UserError(f"{flag} is empty; pass a directory path")
    if p.exists() and not p.is_dir():
        raise UserError(f"output directory {p} is not writable (a file of that name exists); pass a "
                        f"directory with {flag}")
    why = _why_not_creatable(p)
    if why:
        raise UserError(f"output directory {p} is not writable ({why}); pass a writable {flag}")
    return p


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (after :func:`check_writable_dir`) and prove it is writable.

    Call it only once every other check passed: the directory it creates stays behind.
    """
    p = check_writable_dir(path, flag)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".tuner-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {p} is not writable ({exc.strerror or exc}); "
                        f"pass a writable {flag}") from None
    return p


# What matplotlib's savefig writes (chosen by the file suffix); no suffix means PNG.
IMAGE_SUFFIXES = ("", ".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif",
                  ".tiff", ".webp")


def check_writable_file(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Prove ``path`` can be written (or appended to) as a file, creating nothing.

    Its parent directories may not exist yet (:func:`ensure_parent` makes them when the file is
    written), but no component may be a regular file and the nearest existing one must be writable.
    """
    p = Path(path)
    if not str(path).strip():
        raise UserError(f"{flag} is empty; pass a file path")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {p}: unknown image type {p.suffix!r}; use one of "
                        f"{', '.join(s for s in suffixes if s)}")
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; pass a file path")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise UserError(f"{flag} {p}: the file is not writable; pass a writable path")
        return p
    why = _why_not_creatable(p.parent)
    if why:
        raise UserError(f"{flag} {p} cannot be written ({why}); pass a writable path")
    return p


def ensure_parent(path: str | Path, flag: str) -> Path:
    """Make the parent directories of an output file (after :func:`check_writable_file` and every other
    check)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {p} cannot be written ({exc.strerror or exc}); "
                        f"pass a writable path") from None
    return p
