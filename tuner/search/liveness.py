"""Whether a process still runs: the drivers' session table and the Ray reaper both ask (stdlib only)."""
from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (or belongs to another user); a zombie, killed but not yet reaped by its
    parent, counts as dead, and so does a process that vanished between the two checks."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
