"""Where a result came from: the commit of the code that made it (policy files, MLflow runs)."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """Commit of the checkout this package runs from, or None (an installed wheel, no git, no commits).

    Cached: the code does not change under a running process, and a search asks once per run.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None
