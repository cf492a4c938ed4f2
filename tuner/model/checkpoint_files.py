"""Cheap, read-only checks that a path can be a torch checkpoint (no tensor read, no torch import).

Below :mod:`tuner.model.weights_check` (VAR) and :mod:`tuner.model.infinity_weights` (Infinity), which
both use it, so neither imports the other.
"""
from __future__ import annotations

import os
from pathlib import Path

from tuner.errors import UserError


def _is_torch_checkpoint(path: Path) -> bool:
    """A complete zip archive (torch.save since 1.6) or a legacy torch pickle; reads a few bytes only."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    except OSError:
        return False


def check_checkpoint_file(path: str | Path, what: str, flag: str) -> Path:
    """Cheap, read-only proof that ``path`` can be a checkpoint (exists, readable, torch format)."""
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "not found"
        raise UserError(f"{what} checkpoint {kind}: {p}; pass an existing file with {flag}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} checkpoint {p} is not readable; fix its permissions or pass another file "
                        f"with {flag}")
    if not _is_torch_checkpoint(p):
        raise UserError(f"{p} is not a readable PyTorch checkpoint (not a zip-format torch checkpoint: "
                        f"truncated, corrupt or not a checkpoint); re-download or re-save it and pass it "
                        f"with {flag}")
    return p
