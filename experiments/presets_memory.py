"""Memory of the paper presets per model (docs/design.md, Memory), as planned — no weights needed.

    python -m experiments.presets_memory    # writes experiments/presets_memory.md

ams/scalekv budgets depend on which layers (pairs) are cache-demanding / drafters, but their memory
depends only on how many: for models without local weights the layer roles come from a placeholder
calibration, so the fractions are exact while the roles are not (recalibrate with real weights).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from tuner.cli.policy_opts import placeholder_calibration
from tuner.memory import memory_report
from tuner.model.config import model_config
from tuner.policies.base import CacheGeometry, PolicySpec
from tuner.presets import paper_presets

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    models = ["d16", "d20", "d24", "d30", "d36"]
    lines = ["# Paper presets: planned KV memory per image (fp16, CFG)", "",
             f"Command: `python -m experiments.presets_memory`; date {dt.date.today().isoformat()}; "
             "pure arithmetic (no weights, no GPU). Fraction = policy KV bytes / full-cache KV bytes, where "
             "the full cache is every token of every scale (last included) in every layer, K and V in fp16, "
             "2 rows per image (docs/design.md, Memory). A policy's bytes include the shared workspace for "
             "the current scale (256 tokens of one layer at 256px).", "",
             "| model | preset | KV MiB / image | fraction | reduction |", "|---|---|---|---|---|"]
    for name in models:
        cfg = model_config(name)
        cal = placeholder_calibration(cfg)
        spec = PolicySpec(CacheGeometry.from_var_config(cfg.var), name, cal)
        full = memory_report(paper_presets(cfg, cal)["ams"], cfg, spec=spec).full_kv_bytes_per_image
        lines.append(f"| {name} | full | {full / 2**20:.1f} | 100.0% | 0% |")
        for preset, pol in paper_presets(cfg, cal).items():
            r = memory_report(pol, cfg, spec=spec)
            lines.append(f"| {name} | {preset} | {r.kv_bytes_per_image / 2**20:.1f} | "
                         f"{100 * r.fraction:.1f}% | {100 * (1 - r.fraction):.1f}% |")
    lines += ["", "## How this relates to the papers' accounting", "",
              "- AMS-KV reports 71-79% KV reduction on d30/d36 relative to the official cache (which also "
              "holds the last scale). Our `ams` preset (2 condensed scales, window 1, 2 for the 25% most "
              "demanding layers) plans 69% reduction on d30, just below that range; `--param c_min=...` or "
              "the search reach further.",
              "- ScaleKV's percentages are relative to the tokens cached *before* the last scale (424 of 680 "
              "at 256px) and exclude the transient last scale; our `scalekv_10` plans 10% of those 424 "
              "tokens per layer, which is ~6.2% of our full cache, plus the 256-token workspace (~1.25% of "
              "the full d30 cache) — hence ~7-10% in our accounting.",
              "- The official code under autocast keeps K in fp32 (V in fp16): its real full cache is 1.5x "
              "larger than the fp16 figure used here, so reductions measured against the official runtime "
              "are larger still."]
    out = ROOT / "experiments" / "presets_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
