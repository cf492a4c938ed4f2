"""The default search against the previous default, on tiny at 15% memory: agreement, quality, images.

    python -m experiments.search_efficiency            # -> experiments/search/efficiency.{md,csv,png}

Runs the real CLI (`tuner search --mem-target 15%`, in-process evaluation, no MLflow) for two sampler
seeds with

- **multi-fidelity** (today's default): paired PSNR with successive halving over 8 → 32 → 128 images,
  duplicates not counted, final round on 128 held-out images;
- **single-fidelity** (the previous default): paired PSNR on 8 images per trial, final round on 32;
- single-fidelity with as many trials as the multi-fidelity run generated screening images for
  (**equal images**).

Each exported policy is then measured on 512 fresh held-out images paired with the full cache (PSNR with
its standard error, paired fid_vs_full), and the two seeds' winners of each setting are compared image by
image (the paired difference and its standard error). Images are counted from the study's evaluation log
(every generated image, screening and final round); "images to the winner" is the screening images
generated until the exported plan's last screening chunk was measured.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 31000
COMMON = ["--model", "tiny", "--mem-target", "15%", "--metric", "psnr", "--family", "all", "--workers", "0",
          "--device", "cpu", "--attention-backend", "torch", "--mlflow-uri", "none", "--no-progress",
          "--proxy-candidates", "64", "--proxy-top", "8"]
SETTINGS = {
    "multi-fidelity": ["--trials", "40", "--samples", "128", "--min-samples", "8", "--reduction-factor", "4",
                       "--final-samples", "128"],
    "single-fidelity": ["--trials", "40", "--samples", "8", "--min-samples", "8", "--final-samples", "32"],
}


def run_search(name: str, flags: list[str], seed: int, work: Path, reuse: bool = False) -> dict:
    out = work / f"{name}-seed{seed}"
    if reuse and (out / "wall_s").is_file() and any(out.glob("policy_tiny_*.json")):
        return {"setting": name, "seed": seed, "out": out, "wall_s": float((out / "wall_s").read_text()),
                **study_facts(out)}
    argv = [sys.executable, "-m", "tuner", "search", *COMMON, *flags, "--seed", str(seed), "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    (work / f"{name}-seed{seed}.log").write_text(proc.stdout + proc.stderr)
    (out / "wall_s").write_text(f"{wall}")
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return {"setting": name, "seed": seed, "out": out, "wall_s": wall, **study_facts(out)}


def study_facts(out: Path) -> dict:
    """Images generated, trials, duplicates and the winner's plan from the study database."""
    import optuna

    from tuner.search.storage import TunerTables

    storage = f"sqlite:///{out / 'study.db'}"
    cfg = json.loads((out / "config.json").read_text())
    study = optuna.load_study(study_name=cfg["study_name"], storage=storage)
    tables = TunerTables(storage)
    try:
        log = tables.evaluation_log(cfg["study_name"])
        exports = tables.exports(cfg["study_name"])
    finally:
        tables.close()
    policy_file = next(out.glob("policy_tiny_*.json"))
    doc = json.loads(policy_file.read_text())
    winner_key = exports[-1].policy_hash
    final_keys = {e["eval_key"] for e in log if e["images"] == cfg["final_samples"]}
    screening = [e for e in log if e["eval_key"] not in final_keys]
    total, to_winner = 0, None
    for e in screening:
        total += e["images"]
        if e["policy_hash"] == winner_key:
            to_winner = total
    states = [t.state.name for t in study.trials]
    return {"policy_file": policy_file, "family": doc["policy"]["family"], "params": doc["policy"]["params"],
            "screen_images": sum(e["images"] for e in screening),
            "final_images": sum(e["images"] for e in log if e["eval_key"] in final_keys),
            "images_to_winner": to_winner, "trials": len(states), "pruned": states.count("PRUNED"),
            "duplicates": sum("duplicate_of" in t.user_attrs for t in study.trials),
            "winner_trial": doc.get("provenance", {}).get("trial"),
            "winner_preset": doc.get("provenance", {}).get("preset")}


def held_out(rows: list[dict], samples: int) -> None:
    """PSNR ± SE and paired fid_vs_full of each winner on ``samples`` fresh images; per-image PSNR kept."""
    import torch

    from tuner.policies.registry import make_policy
    from tuner.quality.evaluate import EvalSpec, build_evaluator
    from tuner.quality.metrics import frechet_distance, mean_and_se, psnr_per_image

    ev = build_evaluator("tiny", backend="torch")
    spec = EvalSpec.balanced(ev.loaded.config.var.num_classes, samples, seed=HELD_OUT_SEED, batch_size=64)
    ref = ev.reference(spec)
    cache: dict[str, tuple] = {}
    for r in rows:
        key = json.dumps([r["family"], r["params"]], sort_keys=True)
        if key not in cache:
            images, _, _ = ev.generate(make_policy(r["family"], r["params"]), spec)
            per = psnr_per_image(images, ref.images)
            cache[key] = (per, frechet_distance(ev.embed(images), ref.features))
        per, fd = cache[key]
        r["per_image"] = per
        r["psnr"], r["psnr_se"] = mean_and_se(per)
        r["fid_vs_full"] = fd
    del torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--work", default="/tmp/search_efficiency")
    ap.add_argument("--reuse", action="store_true",
                    help="read finished searches in --work instead of rerunning")
    ap.add_argument("--no-equal-images", action="store_true",
                    help="skip the single-fidelity runs with as many screening images as multi-fidelity")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "search"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name, flags in SETTINGS.items():
        for seed in args.seeds:
            rows.append(run_search(name, flags, seed, work, args.reuse))
            print({k: v for k, v in rows[-1].items() if k != "params"}, flush=True)
    multi = [r for r in rows if r["setting"] == "multi-fidelity"]
    matched = max(8, round(sum(r["screen_images"] for r in multi) / len(multi) / 8))
    for seed in [] if args.no_equal_images else args.seeds:
        flags = ["--trials", str(matched), "--samples", "8", "--min-samples", "8", "--final-samples", "32"]
        rows.append(run_search("single-fidelity, equal images", flags, seed, work, args.reuse))
        print({k: v for k, v in rows[-1].items() if k != "params"}, flush=True)
    held_out(rows, args.held_out)
    write(Path(args.out), rows, args, time.time() - t0, argv, matched)
    return 0


def agreement(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per setting: mean and SE of the per-image PSNR difference between the first two seeds' winners."""
    out = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        a, b = [r for r in rows if r["setting"] == name][:2]
        d = (a["per_image"] - b["per_image"]).double()
        out[name] = (float(d.mean()), float(d.std()) / math.sqrt(d.numel()))
    return out


def write(out: Path, rows, args, wall, argv, matched) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["setting", "seed", "family", "winner_trial", "winner_preset", "psnr", "psnr_se", "fid_vs_full",
            "screen_images", "final_images", "images_to_winner", "trials", "pruned", "duplicates", "wall_s",
            "params"]
    with open(out / "efficiency.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "params": json.dumps(r["params"], sort_keys=True)})
    cmd = "python -m experiments.search_efficiency " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Search efficiency on tiny at 15%: multi-fidelity vs single-fidelity screening",
        "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, CPU; date "
        f"{dt.date.today().isoformat()}; wall time {wall / 60:.1f} min. Every search: `tuner search "
        f"{' '.join(COMMON)} --seed S` plus the setting's flags (below). Held-out: each exported policy on "
        f"{args.held_out} fresh images (seed {HELD_OUT_SEED}+j, batches of 64) paired with the full cache.",
        "",
    ]
    for name, flags in SETTINGS.items():
        lines.append(f"- **{name}**: `{' '.join(flags)}`")
    if not args.no_equal_images:
        lines.append(f"- **single-fidelity, equal images**: `--trials {matched} --samples 8 "
                     "--final-samples 32` (as many screening images as the multi-fidelity runs generated "
                     "on average)")
    lines += ["",
              "| setting | seed | winner | held-out PSNR (dB) ± SE | paired fid_vs_full | screening images | "
              "images to the winner | final-round images | trials (pruned, duplicates not counted) | "
              "wall (s) |", "|" + "---|" * 10]
    for r in rows:
        who = f"trial {r['winner_trial']}" + (f" = {r['winner_preset']}" if r["winner_preset"] else "")
        who = f"{r['family']} ({who})"
        lines.append(f"| {r['setting']} | {r['seed']} | {who} | {r['psnr']:.2f} ± {r['psnr_se']:.2f} | "
                     f"{r['fid_vs_full']:.3f} | {r['screen_images']} | {r['images_to_winner']} | "
                     f"{r['final_images']} | {r['trials']} ({r['pruned']}, {r['duplicates']}) | "
                     f"{r['wall_s']:.0f} |")
    lines += ["", "Seed agreement (per-image PSNR of seed 0's winner minus seed 1's, on the same held-out "
              "images): " + "; ".join(f"{k}: {m:+.3f} ± {s:.3f} dB" for k, (m, s) in agreement(rows).items())
              + "."]
    from experiments.tiny_results import write_keeping_conclusion

    path = out / "efficiency.md"
    write_keeping_conclusion(path, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
