"""Head-aware budgets on held-out seeds: HACK and HeatKV against every other family at equal memory, and
the search winner with heads in its space against the winner without them.

    python -m experiments.heads_results                       # tiny, 1000 images -> experiments/heads/
    python -m experiments.heads_results --samples 50 --search-trials 12 --out /tmp/h   # quick look

The protocol of experiments/tiny_results.py (1,000 images per seed set, labels cycling over the
classes, seed sets A = 1000+j, B = 5000+j, C = 9000+j; metrics paired with the full cache on seed
set A; the noise floor is the full cache on B and C), with:

- every family (window, sink_window, ams, scalekv, hack, heatkv) in its paper / baseline shape,
  16-bit as published, its one memory knob fitted to 10, 15 and 25% of the full cache;
- per target two runs of ``tuner search --mem-target T`` (the product command, default budget): with
  heads (the default space ``all``, which holds ``hack``, ``heatkv`` and the ``budgets`` family's
  contextual/structural head split) and without them (the same families and spaces minus every
  per-head dimension, written next to the results as ``no_heads.yaml``); each exported policy is
  evaluated on seed set A;
- per row the per-image PSNR's standard error, and per comparison the *paired* PSNR difference with
  its standard error (same images, same seeds).

"Beats" means: paired PSNR difference > 2 standard errors and paired fid_vs_full lower by more than the
spread of the noise floor's three other-seed Fréchet distances; "ties" otherwise, unless it loses.
Writes results.md, results.csv and results.png into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from experiments.quant_results import Rows
from experiments.tiny_results import TARGETS, family_policies, noise_floor, seed_sets
from tuner.quality.evaluate import build_evaluator

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("window", "sink_window", "ams", "scalekv", "hack", "heatkv")
HEAD_FAMILIES = ("hack", "heatkv")
WITH, WITHOUT = "searched, heads in the space", "searched, no per-head dimension"


def shapes() -> dict:
    """The compared shape of every family (tiny_results' four, plus the head-aware presets)."""
    return {**family_policies(), "hack": ("hack", {"budget_fraction": 0.3}),
            "heatkv": ("heatkv", {"keep_fraction": 0.5})}


def fit(ev, name: str, target: float):
    """``(family, params)`` of ``name`` with its knob fitted to ``target`` (tuner.policies.fit), or None."""
    from tuner.mem_target import MemTarget
    from tuner.memory import as_geometry, memory_report
    from tuner.policies.fit import fit_to_memory
    from tuner.policies.registry import make_policy

    cfg, limit = ev.loaded.config, MemTarget(fraction=target)
    family, params = shapes()[name]
    fitted = fit_to_memory(make_policy(family, params), as_geometry(cfg), lambda p: limit.fits(
        memory_report(p, cfg, spec=ev.policy_spec(p)).fraction, 0))
    return None if fitted is None else (family, fitted.params())


def no_heads_space(path: Path) -> Path:
    """A space file with every searchable family except the head-aware ones, and ``budgets`` without
    its head split (the shipped file's lines minus the per-head ones)."""
    from tuner.search.space_files import family_space_file, searchable_families

    names = [f for f in searchable_families() if f not in HEAD_FAMILIES and f != "budgets"]
    budgets = family_space_file("budgets").read_text().splitlines()
    head_keys = ("_head_split:", "contextual_weight:", "contextual_fraction:")
    kept = [ln for ln in budgets if not ln.strip().startswith(head_keys)]
    body = "\n".join(ln for ln in kept if not ln.startswith(("schema_version", "description", "#")))
    path.write_text("# experiments/heads_results.py: every family without a per-head dimension\n"
                    "schema_version: 1\ndescription: no per-head budgets\ninclude:\n"
                    + "".join(f"  - {family_space_file(f)}\n" for f in names) + body + "\n")
    return path


def run_search(target: float, out: Path, args, space: Path | None) -> Path:
    """``tuner search --mem-target T`` into ``out`` (resumed when already there); its exported policy."""
    import shlex
    import subprocess

    cmd = [sys.executable, "-m", "tuner", "search", "--mem-target", f"{round(target * 100):d}%", "--out",
           str(out), "--mlflow-uri", "none"]
    cmd += ["--trials", str(args.search_trials)] if args.search_trials else []
    cmd += ["--space", str(space)] if space is not None else []
    print("$", shlex.join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    files = sorted(out.glob("policy_*.json"))
    if not files:
        raise SystemExit(f"the search into {out} exported no policy")
    return files[0]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000, help="images per seed set")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--search-trials", type=int, default=None,
                    help="tuner search --trials (default: its own)")
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "heads")
    args = ap.parse_args(argv)
    args.targets = tuple(float(t) for t in args.targets.split(","))
    return args


def main(argv=None) -> None:
    from experiments.heads_report import write
    from tuner.policy_file import load_policy_file

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    plain = no_heads_space(args.out / "no_heads.yaml")
    searched = {(t, label): run_search(t, args.out / f"search-{round(t * 100)}-{tag}", args, space)
                for t in args.targets
                for label, tag, space in ((WITH, "heads", None), (WITHOUT, "noheads", plain))}
    args.search_minutes = (time.time() - t0) / 60
    ev = build_evaluator("tiny")
    specs = seed_sets(ev.loaded.config.var.num_classes, args.samples, args.batch_size)
    floor = noise_floor(ev, *specs)
    rows = Rows(ev, specs[0], specs[1])
    for target in args.targets:
        for name in FAMILIES:
            found = fit(ev, name, target)
            if found is not None:
                rows.add(name, "compute", target, *found)
        for label in (WITH, WITHOUT):
            policy, _ = load_policy_file(searched[(target, label)], ev.loaded.config)
            rows.add(label, "searched", target, policy.family, policy.params())
    args.minutes = (time.time() - t0) / 60
    write(floor, rows, args)


if __name__ == "__main__":
    main()
