"""`tuner bench` on Infinity-2B with random weights on the CPU, at a small resolution: allocated == planned
for the full cache, ScaleKV and the searched joint shapes (issue 19).

    python -m experiments.infinity_bench   # -> experiments/infinity/bench.md (+ bench_policies/*.json)

The real 2B transformer (32 blocks, width 2048, random weights, ~8 GB in fp32) runs the first 4 scales of
its 1:1 schedule (sides 1 2 4 6: 57 tokens, a 96² image). Each policy is written as a policy file
(placeholder layer roles: no weights to calibrate) and run once by the code of ``tuner bench --policy
FILE``; the commands that reproduce each row are in the table. No times are reported: one
CPU run of a 2B model is not a speed measurement (``tuner bench`` on a GPU is). The point is that the
bytes a run allocates are the bytes the planner counts, for 16-bit and quantized buffers alike.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from experiments.infinity_plan import joint_shapes

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "infinity"
SIDES = (1, 2, 4, 6)
BATCH = 2
FRACTION = 0.10  # the joint shapes' knob, fitted to this fraction of the full cache at these sides


def main() -> None:
    import torch

    from tuner.cli.bench_cmd import run_bench
    from tuner.cli.policy_opts import placeholder_calibration
    from tuner.model.loading import load_model
    from tuner.policies.base import PolicySpec
    from tuner.policies.full import FullPolicy
    from tuner.policies.scalekv import ScaleKVPolicy
    from tuner.policy_file import load_policy_file, write_policy_file

    torch.manual_seed(0)
    loaded = load_model("infinity-2b", random_weights=True, sides=SIDES)
    cfg = loaded.config
    spec = PolicySpec(cfg.geometry, cfg.name, placeholder_calibration(cfg))
    policies = [("full", FullPolicy()), ("scalekv 10%", ScaleKVPolicy(0.10))]
    policies += [(label.split(",")[0], p) for label, _, p in joint_shapes(cfg, spec, FRACTION)]
    folder = OUT / "bench_policies"
    folder.mkdir(parents=True, exist_ok=True)
    sides = ",".join(map(str, SIDES))
    rows = []
    for label, policy in policies:
        slug = label.replace(" ", "_").replace("%", "pct").replace(":", "").replace("+", "")
        path = write_policy_file(folder / f"{slug.replace('__', '_')}.json", policy, cfg, spec=spec)
        policy, info = load_policy_file(path, cfg)  # what `tuner bench --policy` reads back
        r = run_bench(loaded, policy, PolicySpec(cfg.geometry, cfg.name, info.calibration), batch=BATCH,
                      device="cpu", dtype=torch.float32, backend="torch", warmup=0, repeats=1)
        same = "yes" if r["kv_bytes_allocated"] == r["kv_bytes_planned"] else "**no**"
        rows.append(f"| {label} | {r['kv_bytes_planned']:,} | {r['kv_bytes_allocated']:,} | {same} | "
                    f"{100 * r['memory_fraction']:.1f}% | `tuner bench --model infinity-2b --random-weights "
                    f"--sides {sides} --batch {BATCH} --policy {path.relative_to(ROOT)}` |")
        print(rows[-1], flush=True)
    lines = [
        "# Infinity-2B, random weights, CPU: `tuner bench` allocates what the planner counts", "",
        f"Command: `python -m experiments.infinity_bench`; date {dt.date.today().isoformat()}; "
        f"{r['machine']}; fp32, torch attention, batch {BATCH} (2 rows each: CFG), sides {sides} "
        "(57 tokens, 96²), one run per policy.", "",
        "The 2B transformer at full width and depth with random weights and seeded random text features "
        "(no T5 needed); the images mean nothing. Policies: the full cache, ScaleKV at 10% (placeholder "
        "drafter roles), and the searched joint shapes of the shipped tiny winners (family, structure, "
        f"storage format) with their token knob fitted to {FRACTION:.0%} here, as [plan.md](plan.md) "
        "fits them at 1024². No times: a single CPU run of a 2B model is not a speed measurement (the "
        "`tuner bench` commands below time it with warm-up and repeats).", "",
        "| policy | KV bytes planned | allocated | equal | fraction | reproduce |",
        "|---|---|---|---|---|---|"] + rows
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")
    print((OUT / "bench.md").read_text())


if __name__ == "__main__":
    main()
