"""Every paper preset and baseline, as a policy file, generated on d16/d30 random weights: KV bytes
measured from the cache vs the planner.

    python -m experiments.bench_presets [--models d16,d30] [--out experiments/bench_presets.md]

Per model: ``tuner presets --random-weights`` writes the preset files (calibrated on 2 random-weight
generations: the roles are meaningless for quality, the memory accounting is what is checked), then
each file is applied exactly as ``tuner bench --policy FILE`` does (one image, fp32, CPU) and the
bytes the KV cache allocated are compared with the plan. Quality needs the official weights.
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d16,d30")
    ap.add_argument("--work", default="/tmp/varkv-bench-presets", help="where the preset files are written")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "bench_presets.md"))
    args = ap.parse_args(argv)

    import torch

    from tuner.cli.bench_cmd import machine_description, run_bench
    from tuner.cli.model_opts import load_model_from_options, load_policy_option

    lines = ["# Paper presets on d16/d30 random weights: measured KV bytes == planned", "",
             f"Command: `python -m experiments.bench_presets --models {args.models}`; "
             f"{machine_description('cpu')}; {dt.date.today().isoformat()}.", "",
             "Each row is `tuner bench --model M --random-weights --policy FILE --batch 1 --repeats 1` on "
             "the preset file `tuner presets --model M --random-weights` wrote (fp32 cache; fractions are "
             "the same in fp16). No latency column: one cold image per policy on a shared CPU is not a "
             "speed measurement (warmed-up, repeated timings: bench_cpu.md).", "",
             "| model | preset | memory | KV bytes planned | KV bytes allocated | equal |",
             "|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        work = Path(args.work) / model
        subprocess.run([sys.executable, "-m", "tuner", "presets", "--model", model, "--random-weights",
                        "--calibration-samples", "2", "--out", str(work)], check=True, cwd=ROOT)
        loaded = load_model_from_options(model, None, None, None, True, "cpu")
        for path in sorted(work.glob("*.json")):
            policy, spec = load_policy_option(str(path), loaded)
            r = run_bench(loaded, policy, spec, batch=1, device="cpu", dtype=torch.float32, backend="torch",
                          warmup=0, repeats=1)
            ok = r["kv_bytes_allocated"] == r["kv_bytes_planned"]
            lines.append(f"| {model} | {path.stem.replace('_at_', '@')} | {100 * r['memory_fraction']:.2f}% "
                         f"| {r['kv_bytes_planned']:,} | {r['kv_bytes_allocated']:,} "
                         f"| {'yes' if ok else 'NO'} |")
            print(lines[-1], flush=True)
        del loaded
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
