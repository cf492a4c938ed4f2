"""Plumbing of the GPU check: the machine description, bounded subprocess steps, the import blocker.

``python -m experiments.gpu.env`` prints the machine as one JSON object. The driver asks a
subprocess rather than importing torch itself: a CUDA context in the driver would hold several
hundred MiB of device memory for the whole run and skew the max-batch measurement.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# What the device image lacks (issue 20): nothing the check runs may import these.
BLOCKED_MODULES = ("optuna", "ray", "mlflow", "sqlalchemy")

# A sitecustomize that makes ``import optuna`` (etc.) raise ImportError in every Python process
# started with its folder first on PYTHONPATH, then runs the sitecustomize it shadows (if any), so
# a device image that relies on its own keeps working.
_BLOCKER = '''"""Written by experiments/gpu/env.py: block {names} in this process (GPU-check dry run)."""
import os as _os
import sys as _sys

for _name in {names!r}:
    _sys.modules[_name] = None  # the next ``import NAME`` raises ImportError

_here = _os.path.dirname(_os.path.abspath(__file__))
for _entry in list(_sys.path):
    _path = _os.path.join(_os.path.abspath(_entry or _os.getcwd()), "sitecustomize.py")
    if _os.path.dirname(_path) != _here and _os.path.isfile(_path):
        with open(_path) as _f:
            exec(compile(_f.read(), _path, "exec"), {{"__name__": "sitecustomize", "__file__": _path}})
        break
'''


def write_blocker(folder: Path) -> Path:
    """Write the blocking ``sitecustomize.py`` into ``folder``; put ``folder`` first on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(names=BLOCKED_MODULES))
    return folder


def machine_info() -> dict:
    """Device, memory and library versions of this process's machine (imports torch)."""
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    info = {"cuda": cuda, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "cuda_runtime": torch.version.cuda,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), total_memory=int(props.total_memory),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    else:
        info.update(device=f"CPU {platform.processor() or platform.machine()} "
                           f"({os.cpu_count()} logical cores)",
                    total_memory=None, capability=None, sms=None)
    return info


@dataclass
class StepResult:
    """How one step of the check ended; ``status`` is ok, failed, timeout or skipped."""

    name: str
    status: str
    seconds: float = 0.0
    rc: int | None = None
    note: str = ""
    log: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return asdict(self)


def run_logged(name: str, cmd: list[str], *, timeout_s: float, log_path: Path, env: dict,
               cwd: Path) -> StepResult:
    """Run ``cmd`` with its output both echoed (prefixed) and written to ``log_path``, killed after
    ``timeout_s``.

    The child gets its own process group so that a timeout ends everything it started (pytest's
    workers, a Triton compile) and nothing else.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[{name}] $ {' '.join(cmd)}  (limit {timeout_s:.0f} s)", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group only
            rc = proc.wait()
            status = "timeout"
        reader.join(timeout=10)
    seconds = time.monotonic() - t0
    note = f"killed after {timeout_s:.0f} s" if status == "timeout" else (
        "" if rc == 0 else f"exit status {rc}")
    print(f"[{name}] {status} in {seconds:.1f} s {note}".rstrip(), flush=True)
    return StepResult(name, status, seconds, rc, note, str(log_path))


def main() -> None:
    print(json.dumps(machine_info()))


if __name__ == "__main__":
    main()
