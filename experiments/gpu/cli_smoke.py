"""``python -m experiments.gpu.cli_smoke WORKDIR``: the `tuner` commands the GPU check relies on, run once
cheaply (CPU, tiny model) in one process, then proof that none of them imported a blocked module.

The device image has no optuna, ray, mlflow or sqlalchemy (issue 20). The GPU check itself calls the
library behind ``tuner bench`` / ``tuner presets`` / ``tuner plan`` in its own worker; this step runs
the commands themselves, so their argument parsing and imports are covered too. Under the dry run the
driver also puts :mod:`experiments.gpu.env`'s import blocker on PYTHONPATH, so an import of a blocked
module fails here even on a machine where it is installed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def commands(work: Path) -> list[list[str]]:
    """The commands: a d30 plan sized for a GPU, a one-image tiny bench, tiny presets fitted to 15%."""
    return [
        ["plan", "--model", "d30", "--family", "window", "--param", "max_tokens=93", "--dtype", "bf16",
         "--gpu-mem", "24GiB", "--json"],
        ["bench", "--model", "tiny", "--random-weights", "--batch", "1", "--warmup", "0", "--repeats", "1",
         "--device", "cpu", "--attention-backend", "torch", "--json"],
        ["presets", "--model", "tiny", "--random-weights", "--mem-target", "15%", "--calibration-samples",
         "1", "--device", "cpu", "--out", str(work / "presets-tiny")],
    ]


def run_command(argv: list[str]) -> int:
    """``tuner ARGV`` in this process; its exit status (the CLI always ends with ``sys.exit``)."""
    from tuner.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv=None) -> int:
    from experiments.gpu.env import BLOCKED_MODULES

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m experiments.gpu.cli_smoke WORKDIR", file=sys.stderr)
        return 2
    work = Path(args[0])
    work.mkdir(parents=True, exist_ok=True)
    failed = []
    for cmd in commands(work):
        t0 = time.monotonic()
        print(f"$ tuner {' '.join(cmd)}", flush=True)
        rc = run_command(cmd)
        print(f"-> exit {rc} in {time.monotonic() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(f"tuner {cmd[0]} exited {rc}")
    # A blocked module shows up as None in sys.modules; a real import as a module object.
    imported = sorted(name for name, mod in sys.modules.items()
                      if mod is not None and name.split(".")[0] in BLOCKED_MODULES)
    if imported:
        failed.append(f"imported modules the device lacks: {', '.join(imported)}")
    for line in failed:
        print(f"FAILED: {line}", flush=True)
    if not failed:
        print(f"ok: plan, bench and presets ran without importing {', '.join(BLOCKED_MODULES)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
