"""``python -m experiments.gpu.check OUTDIR [--dry-run]``: the whole GPU check of issue 20, step by step.

Steps, each a subprocess with a time limit, all under one time budget (the GPU is lent for about
15 minutes in all, so the check must end within 8; ``run.sh`` installs the package first):

1. ``env``: device, memory, torch / triton / Python versions (asked of a subprocess so this process
   never holds a CUDA context, which would take memory from the max-batch search);
2. ``imports``: ``tuner plan`` / ``bench`` / ``presets`` run once cheaply, proving they import none
   of optuna, ray, mlflow, sqlalchemy (the device image lacks them);
3. ``pytest``: ``pytest -m gpu tests/kernels`` (on a GPU every selected test must run, none skip);
4. ``kernels``: ``python -m varkv_kernels.bench`` runs (the d30 bf16 run first, the rest after ``e2e``);
5. ``e2e``: :mod:`experiments.gpu.e2e` (images/s, peak memory, max batch vs ``tuner plan``).

A failing step does not stop the others (one GPU session should return everything it can); the
exit status is 1 when any step failed or any planned/measured figure disagreed, 0 otherwise.
Missed speed/memory *targets* are reported in ``summary.md`` but are not failures. ``--dry-run``
runs the same steps on the CPU (Triton interpreter, toy sizes, a fake memory budget for the
max-batch search, the import blocker of :mod:`experiments.gpu.env`) and marks every file DRY RUN.

Output (at most 8 files, the most a device call returns): ``summary.md``, ``kernels.md``,
``e2e.md``, ``maxbatch.md``, ``results.json`` and ``raw.tar.gz`` (logs, CSVs, policy files).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from experiments.gpu import kernel_table, report
from experiments.gpu.env import StepResult, run_logged, write_blocker

ROOT = Path(__file__).resolve().parents[2]

# Per mode: time limits (s) per step, the least time worth starting it with, and the settings.
PROFILES = {
    "gpu": dict(budget_s=450, limits=dict(env=60, imports=90, pytest=150, kernels=100, e2e=300),
                min_start=dict(env=10, imports=20, pytest=30, kernels=30, e2e=90),
                kernel_runs="d30:bf16:16,64;d30:bf16:64:int8,int4;d30:fp16:64;d16:fp16:64",
                e2e=dict(model="d30", device="cuda", batch=64, warmup=1, repeats=3, calibration_samples=2,
                         maxbatch_mem="24GiB", max_probes=8, probe_limit_s=40)),
    "dry": dict(budget_s=240, limits=dict(env=60, imports=90, pytest=90, kernels=60, e2e=90),
                min_start=dict(env=5, imports=5, pytest=5, kernels=5, e2e=5),
                kernel_runs="quick:bf16;quick:fp16",
                # Fake budget: weights + the planner's 1 GiB reserve + room for about 60 full-cache toy
                # images.
                e2e=dict(model="toy", device="cpu", batch=1, warmup=0, repeats=1, calibration_samples=1,
                         maxbatch_mem="1040MiB", max_probes=12, probe_limit_s=10)),
}
STEPS = ("imports", "pytest", "kernels", "e2e")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.gpu.check", description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path, help="where the tables go (created; existing files are replaced)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, toy sizes (a test)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of the driver, s (run.sh: 470 minus the install; else GPU 450, "
                        "dry run 240)")
    p.add_argument("--kernel-runs", default=None,
                   help="MODEL:DTYPE:BATCHES;... (see experiments/gpu/kernel_table.py)")
    p.add_argument("--preset", default="ams", help="the paper preset to compare (a tuner presets name)")
    p.add_argument("--mem-target", default="15%")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="end-to-end dtype")
    p.add_argument("--backend", default="triton", choices=("triton", "torch"), help="end-to-end attention")
    p.add_argument("--batch", type=int, default=None, help="equal batch of the images/s comparison (GPU 64)")
    p.add_argument("--maxbatch-mem", default=None, help="memory of the max-batch search: a size or 'device'")
    p.add_argument("--block-imports", action=argparse.BooleanOptionalAction, default=None,
                   help="run every step with optuna/ray/mlflow/sqlalchemy blocked "
                        "(default: on in the dry run)")
    p.add_argument("--install-status", default="not run",
                   help="what run.sh's pip install did (for the summary)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--test-only-plan-offset", type=int, default=0, metavar="BYTES",
                   help="TEST ONLY: add BYTES to every planned KV-per-image figure, so a test can prove that "
                        "a planned/allocated mismatch makes the check exit 1; never set it for a real run")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        p.error(f"--steps {args.steps!r}: use a comma-separated subset of {','.join(STEPS)}")
    args.steps = steps
    prof = PROFILES["dry" if args.dry_run else "gpu"]
    args.profile = prof
    args.budget_s = args.budget_s or prof["budget_s"]
    try:
        args.runs = kernel_table.parse_runs(args.kernel_runs or prof["kernel_runs"])
    except ValueError as exc:
        p.error(str(exc))
    if args.block_imports is None:
        args.block_imports = args.dry_run
    return args


class Driver:
    """Runs the steps within the budget and keeps their results."""

    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.work = args.work_dir or Path(tempfile.mkdtemp(prefix="varkv-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable
        self.steps: list[StepResult] = []
        self.env = self._env()

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
                   TUNER_CACHE_DIR=str(self.work / "cache"))
        paths = [str(ROOT)] + ([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if self.args.block_imports:
            paths.insert(0, str(write_blocker(self.work / "blocker")))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.args.dry_run:
            env["TRITON_INTERPRET"] = "1"  # before any kernel module is imported, in every child
        else:
            env.pop("TRITON_INTERPRET", None)  # interpreted kernels on a GPU machine would time nothing real
        return env

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, kind: str, cmd: list[str]) -> StepResult:
        limit = min(self.args.profile["limits"][kind], self.left())
        if limit < self.args.profile["min_start"][kind]:
            res = StepResult(name, "skipped", note=f"time budget: {max(0.0, self.left()):.0f} s left of "
                                                   f"{self.args.budget_s:.0f}")
            print(f"[{name}] skipped ({res.note})", flush=True)
        else:
            res = run_logged(name, cmd, timeout_s=limit,
                             log_path=self.work / "logs" / f"{name.replace(':', '_')}.log",
                             env=self.env, cwd=ROOT)
        self.steps.append(res)
        return res


def pytest_counts(xml_path: Path) -> dict:
    """tests / failures / errors / skipped from pytest's JUnit XML (summed over its suites)."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def check_pytest(res: StepResult, xml_path: Path, dry_run: bool) -> None:
    """On a GPU every selected test must run (a skip means CUDA or triton was not seen); the dry run
    skips all."""
    if res.status in ("skipped", "timeout") or not xml_path.is_file():
        return
    counts = pytest_counts(xml_path)
    res.details = counts
    ran = counts["tests"] - counts["skipped"]
    res.note = (res.note + "; " if res.note else "") + f"{ran} ran, {counts['skipped']} skipped, " \
        f"{counts['failures']} failed, {counts['errors']} errors"
    if counts["tests"] == 0 or (not dry_run and counts["skipped"]):
        res.status = "failed"
        res.note += " (on a GPU no gpu test may skip)" if counts["tests"] else " (no gpu test collected)"


def run_all(d: Driver) -> dict:
    a, work, py = d.args, d.work, d.python
    env_res = d.step("env", "env", [py, "-m", "experiments.gpu.env"])
    machine = {}
    if env_res.ok:
        lines = [ln for ln in Path(env_res.log).read_text().splitlines() if ln.startswith("{")]
        machine = json.loads(lines[-1]) if lines else {}
    if not a.dry_run and not env_res.ok:
        return machine  # the env step's own failure says why
    if not a.dry_run and not machine.get("cuda"):
        env_res.status, env_res.note = ("failed",
                                        "no CUDA GPU visible: run on a GPU machine, or pass --dry-run")
        return machine
    if "imports" in a.steps:
        d.step("imports", "imports", [py, "-m", "experiments.gpu.cli_smoke", str(work / "cli")])
    if "pytest" in a.steps:
        xml_path = work / "pytest.xml"
        res = d.step("pytest", "pytest", [py, "-m", "pytest", "-m", "gpu", "-q", "tests/kernels", "-p",
                                          "no:cacheprovider", "--timeout", "120", f"--junitxml={xml_path}"])
        check_pytest(res, xml_path, a.dry_run)
    device = "cpu" if a.dry_run else "cuda"
    kernel_steps = [(f"kernels:{r.label}", r.command(py, work / "kernels" / r.label, device=device))
                    for r in a.runs] if "kernels" in a.steps else []
    for name, cmd in kernel_steps[:1]:
        d.step(name, "kernels", cmd)
    if "e2e" in a.steps:
        e = a.profile["e2e"]
        limit = min(a.profile["limits"]["e2e"], d.left())
        cmd = [py, "-m", "experiments.gpu.e2e", "--out", str(work / "e2e"), "--model", e["model"],
               "--device", e["device"], "--dtype", a.dtype, "--backend", a.backend,
               "--batch", str(a.batch or e["batch"]), "--warmup", str(e["warmup"]), "--repeats",
               str(e["repeats"]), "--mem-target", a.mem_target, "--preset", a.preset,
               "--calibration-samples", str(e["calibration_samples"]),
               "--maxbatch-mem", a.maxbatch_mem or e["maxbatch_mem"], "--max-probes", str(e["max_probes"]),
               "--probe-limit-s", str(e["probe_limit_s"]), "--deadline-s", f"{max(1.0, limit - 20):.0f}",
               "--plan-offset", str(a.test_only_plan_offset)]
        d.step("e2e", "e2e", cmd)
    for name, cmd in kernel_steps[1:]:
        d.step(name, "kernels", cmd)
    return machine


def write_outputs(d: Driver, machine: dict) -> int:
    """The tables, results.json and raw.tar.gz into OUTDIR; returns the exit status."""
    a, out = d.args, d.args.outdir
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m experiments.gpu.check " + " ".join(sys.argv[1:])

    def head(title: str) -> list[str]:
        return report.header(title, machine, dry_run=a.dry_run, command=command, date=date)

    rows = []
    for csv_path in sorted((d.work / "kernels").glob("*/kernels_bench.csv")):
        rows += kernel_table.read_rows(csv_path)
    ksum = kernel_table.summarize(rows)
    kmodel, kbatch = ("d30", 64) if not a.dry_run else (max((s["model"] for s in ksum), default="d2"),
                                                          max((s["batch"] for s in ksum), default=1))
    e2e_path = d.work / "e2e" / "e2e.json"
    e2e = json.loads(e2e_path.read_text()) if e2e_path.is_file() else {"policies": [], "mismatches": [],
                                                                         "error": "no e2e.json"}
    targets = kernel_table.target_rows(ksum, kmodel, kbatch) + report.e2e_targets(e2e)

    mismatches = [f"step {s.name}: {s.status}" + (f" ({s.note})" if s.note else "")
                  for s in d.steps if not s.ok]
    mismatches += list(e2e.get("mismatches", []))
    if e2e.get("error") and "e2e" in a.steps:  # a rerun of other steps only has no e2e result, rightly
        mismatches.append(f"e2e: {e2e['error']}")
    if a.install_status == "failed":
        mismatches.append("install: pip install --no-deps -e . failed (the steps ran from the source tree)")
    if a.test_only_plan_offset:
        mismatches.append(f"TEST ONLY: planned KV figures were offset by {a.test_only_plan_offset} B "
                          "(--test-only-plan-offset)")

    steps = [{"name": "install", "status": a.install_status, "seconds": 0.0, "note": "run.sh (pip install)"}]
    steps += [s.as_dict() for s in d.steps]
    (out / "kernels.md").write_text("\n".join(head("GPU check: attention kernels")) + "\n"
                                    + ("Latency = sum over one forward's scales, one layer; "
                                       "`python -m varkv_kernels.bench`.\n\n"
                                       + kernel_table.markdown(ksum) if ksum else "No kernel result.\n"))
    (out / "e2e.md").write_text("\n".join(head("GPU check: end to end")) + "\n" + report.e2e_markdown(e2e))
    (out / "maxbatch.md").write_text("\n".join(head("GPU check: max batch, measured vs planned")) + "\n"
                                     + report.maxbatch_markdown(e2e))
    total = time.monotonic() - d.t0
    (out / "summary.md").write_text(report.summary_markdown(head("GPU check: summary"), steps, mismatches,
                                                            targets, dry_run=a.dry_run, total_s=total))
    (out / "results.json").write_text(json.dumps(
        {"dry_run": a.dry_run, "machine": machine, "steps": steps, "mismatches": mismatches,
         "targets": targets, "kernels": ksum, "e2e": e2e, "total_s": total}, indent=1, default=str) + "\n")
    with tarfile.open(out / "raw.tar.gz", "w:gz") as tar:
        for sub in ("logs", "kernels", "e2e", "pytest.xml"):
            if (d.work / sub).exists():
                tar.add(d.work / sub, arcname=sub)
    print((out / "summary.md").read_text(), flush=True)
    return 1 if mismatches else 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    d = Driver(args)
    print(f"GPU check{' (DRY RUN)' if args.dry_run else ''}: steps {','.join(args.steps)}, budget "
          f"{args.budget_s:.0f} s, work dir {d.work}", flush=True)
    try:
        machine = run_all(d)
        code = write_outputs(d, machine)
    finally:
        if args.work_dir is None:
            shutil.rmtree(d.work, ignore_errors=True)
    print(f"GPU check finished in {time.monotonic() - d.t0:.0f} s, exit status {code}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
