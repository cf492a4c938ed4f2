"""Images to quality: the default search against the search as filed, on tiny at 15% memory.

    python -m experiments.search_anytime      # -> experiments/search/anytime.{md,csv,png}

Every side runs the README's main command, `tuner search --mem-target 15%`, with its default flags
(plus in-process evaluation, no MLflow, a sampler seed), for four seeds each:

- **default**: this checkout (paired PSNR, successive halving over 8 → 32 → 128 images, warm starts
  ordered by the zero-generation proxy, duplicates not counted, final round on 128 held-out images);
- **as filed**: the search issue 16 was filed against (commit ``PREVIOUS``, extracted with ``git
  archive``, with ``--metric fid_vs_full``, its metric until then): 8 images per trial, final round on 32;
- **previous default**: the same code with paired PSNR (its default at ``PREVIOUS``);
- **rungs 8-32, final 64**: this checkout with a cheaper schedule.

From each study's evaluation log (every generated image, oldest first) the script rebuilds the
*incumbent* after every finished trial: the completed trial with the best screening value so far, the
policy the search would export if stopped there (before its final round); after the final round it is
the exported policy. Every distinct incumbent is then measured on the same fresh held-out images
paired with the full cache. "Images to quality Q" counts the generated images (screening and final
round) until the incumbent's held-out PSNR first reaches Q, with Q the held-out PSNR of the winners the
search as filed exported (mean over its seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = "1faac82"  # the last commit before issue 16 (search on signal) changed the defaults
FLAGS = ["--model", "tiny", "--mem-target", "15%", "--workers", "0", "--device", "cpu",
         "--attention-backend", "torch", "--mlflow-uri", "none", "--no-progress"]
HELD_OUT_SEED = 41000
# setting -> (code: "this" checkout or the PREVIOUS commit, flags added to FLAGS). "as filed" is the
# search the issue was filed against (fid_vs_full on 8 images, the previous code's metric before it
# switched to paired PSNR) and the reference the target Q comes from.
SETTINGS = {
    "default": ("this", []),
    "as filed": ("previous", ["--metric", "fid_vs_full"]),
    "previous default": ("previous", []),
    "rungs 8-32, final 64": ("this", ["--samples", "32", "--final-samples", "64"]),
    "rungs 8-32, final 32": ("this", ["--samples", "32", "--final-samples", "32"]),
}


def checkout_previous(work: Path) -> Path:
    """The previous default's source tree (its own ``tuner`` package shadows the installed one)."""
    tree = work / f"src-{PREVIOUS}"
    if not (tree / "tuner" / "__init__.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_search(setting: str, seed: int, work: Path, reuse: bool) -> Path:
    """Run one search (or reuse a finished one); returns its output directory."""
    out = work / f"{setting.replace(' ', '-').replace(',', '')}-seed{seed}"
    if reuse and any(out.glob("policy_tiny_*.json")):
        return out
    code, extra = SETTINGS[setting]
    cwd = ROOT if code == "this" else checkout_previous(work)
    env = {**os.environ, "TUNER_CACHE_DIR": str(work / f"cache-{code}")}
    argv = [sys.executable, "-m", "tuner", "search", *FLAGS, *extra, "--seed", str(seed), "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    (work / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{setting} seed {seed} failed:\n{proc.stderr[-3000:]}")
    (out / "wall_s").write_text(f"{time.time() - t0:.1f}")
    return out


def trajectory(out: Path) -> dict:
    """Incumbents of one finished search, each with the images generated when it became incumbent."""
    import optuna

    from tuner.search.storage import TunerTables

    cfg = json.loads((out / "config.json").read_text())
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=cfg["study_name"], storage=storage)
    tables = TunerTables(storage)
    try:
        log = tables.evaluation_log(cfg["study_name"])
        exports = tables.exports(cfg["study_name"])
    finally:
        tables.close()
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    trials = {}
    for t in study.trials:
        key = t.user_attrs.get("policy_hash")
        if t.state.name == "COMPLETE" and key and "duplicate_of" not in t.user_attrs:
            trials.setdefault(key, t)  # the first trial of a plan is the one that generated it
    doc = json.loads(next(out.glob("policy_tiny_*.json")).read_text())
    # The final round comes last and evaluates every candidate on one held-out spec: its eval key.
    final_key = log[-1]["eval_key"]
    screening = [e for e in log if e["eval_key"] != final_key]
    last_row = {e["policy_hash"]: i for i, e in enumerate(screening)}  # a plan's last screening chunk
    steps, best, total = [], None, 0
    for i, e in enumerate(screening):
        total += e["images"]
        t = trials.get(e["policy_hash"])
        finished = t is not None and last_row[e["policy_hash"]] == i
        if finished and (best is None or sign * t.value > sign * best.value):
            best = t
            steps.append({"images": total, "trial": t.number, "family": t.user_attrs["family"],
                          "params": t.user_attrs["policy_params"], "value": t.value})
    screen_images = total
    total += sum(e["images"] for e in log if e["eval_key"] == final_key)
    steps.append({"images": total, "trial": doc.get("provenance", {}).get("trial"), "exported": True,
                  "family": doc["policy"]["family"], "params": doc["policy"]["params"], "value": None})
    return {"out": out, "steps": steps, "total_images": total, "screen_images": screen_images,
            "final_samples": cfg["final_samples"], "trials": len(study.trials),
            "exported_hash": exports[-1].policy_hash if exports else None,
            "wall_s": float((out / "wall_s").read_text()) if (out / "wall_s").is_file() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS)[:4], choices=list(SETTINGS))
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--work", default="/tmp/search_anytime")
    ap.add_argument("--reuse", action="store_true", help="read finished searches in --work")
    ap.add_argument("--searches-only", action="store_true", help="run the searches, measure nothing")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "search"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = []
    for setting in args.settings:
        for seed in args.seeds:
            runs.append({"setting": setting, "seed": seed, **trajectory(run_search(setting, seed, work,
                                                                                   args.reuse))})
            print(f"{setting} seed {seed}: {runs[-1]['total_images']} images, "
                  f"{len(runs[-1]['steps'])} incumbents", flush=True)
    if args.searches_only:
        return 0
    from experiments.search_anytime_report import measure, write

    measure(runs, args.held_out, HELD_OUT_SEED, work / "held_out.pt")
    write(Path(args.out), runs, args, time.time() - t0, argv, PREVIOUS, FLAGS, HELD_OUT_SEED, SETTINGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
