"""Markdown of the GPU check: the end-to-end and max-batch tables, the targets and the summary.

Everything here reads the results the steps wrote (``e2e.json``, varkv_kernels.bench CSVs, step statuses);
nothing measures. Targets (issue 20) that are missed are reported, not failed: the exit status is
about mismatches and broken steps, the targets are the finding.
"""
from __future__ import annotations

MIB = 1 << 20
E2E_SPEEDUP_TARGET = 1.5  # images/s at the same batch, best compressed policy / full cache
MAXBATCH_TARGET = 5.0  # measured max batch, best compressed policy / full cache


def header(title: str, machine: dict, *, dry_run: bool, command: str, date: str) -> list[str]:
    """Title, DRY RUN banner, device and versions: the first lines of every file the check writes."""
    lines = [f"# {title}", ""]
    if dry_run:
        lines += ["**DRY RUN** (CPU, Triton interpreter, toy sizes): these numbers test the script, they "
                  "measure nothing about a GPU.", ""]
    lines += [f"- device: {machine.get('device', '?')}",
              f"- torch {machine.get('torch', '?')} (CUDA {machine.get('cuda_runtime')}), triton "
              f"{machine.get('triton', '?')}, Python {machine.get('python', '?')}",
              f"- date: {date}", f"- command: `{command}`", ""]
    return lines


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / MIB:,.1f}"


def _full(policies: list[dict]) -> dict | None:
    return next((p for p in policies if p["name"] == "full"), None)


def e2e_markdown(e2e: dict) -> str:
    """Images/s at the equal batch, KV bytes planned vs allocated, peak memory vs plan; per-scale latency."""
    pols = [p for p in e2e.get("policies", []) if "bench" in p]
    if not pols:
        return f"No end-to-end result ({e2e.get('error') or 'the step did not get that far'}).\n"
    a = e2e["args"]
    full = _full(pols)
    base = full["bench"]["images_per_s"] if full else None
    lines = [f"`tuner bench --model {a['model']} --random-weights --dtype {a['dtype']} --attention-backend "
             f"{a['backend']} --batch {a['batch']} --warmup {a['warmup']} --repeats {a['repeats']} "
             f"[--policy FILE]`"
             f" (library calls, one process). Peak = `torch.cuda.max_memory_allocated` over the run; planned "
             f"peak = weights + batch × (KV + activations) from `tuner plan`'s terms; unplanned = peak − "
             f"what was resident before the run − batch × (KV + activations): memory the planner does not "
             f"count. images/s and × full are end to end (the whole generate call: scale loop + VQ-VAE "
             f"decode); transformer / decode / e2e ms: medians per batch.", "",
             "| policy | family | cache % | batch | images/s | × full | transformer ms | decode ms | e2e ms "
             "| KV planned (B) "
             "| KV allocated (B) "
             "| equal | peak alloc (MiB) | planned peak (MiB) | peak / planned | unplanned (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pols:
        b = p["bench"]
        speed = f"{b['images_per_s'] / base:.2f}" if base else "-"
        ratio = f"{b['peak_bytes'] / b['planned_peak_bytes']:.2f}" if b.get("peak_bytes") else "n/a"
        unplanned = b["peak_bytes"] - b["resident_bytes_before"] - b["planned_run_bytes"] \
            if b.get("peak_bytes") and b.get("resident_bytes_before") is not None else None
        lines.append(f"| {p['name']} | {p['family']} | {100 * p['fraction']:.2f} | {b['batch']} | "
                     f"{b['images_per_s']:.3f} | {speed} | {b['transformer_ms']:.1f} | "
                     f"{b['decode_ms']:.1f} | {b['end_to_end_ms']:.1f} | {b['kv_bytes_planned']:,} | "
                     f"{b['kv_bytes_allocated']:,} | "
                     f"{'yes' if b['kv_bytes_planned'] == b['kv_bytes_allocated'] else 'NO'}"
                     f" | {_mib(b.get('peak_bytes'))} | {_mib(b['planned_peak_bytes'])} | {ratio} | "
                     f"{_mib(unplanned)} |")
    lines += ["", "Latency per scale (ms, median of the timed runs): where the time goes.", "",
              "| scale | " + " | ".join(p["name"] for p in pols) + " |", "|---|" + "---|" * len(pols)]
    n = max(len(p["bench"]["per_scale_ms"]) for p in pols)
    for s in range(n):
        cells = " | ".join(f"{p['bench']['per_scale_ms'][s]:.2f}" if s < len(p["bench"]["per_scale_ms"])
                           else "-" for p in pols)
        lines.append(f"| {s} | {cells} |")
    return "\n".join(lines) + "\n"


def _bounds(search: dict) -> str:
    if search["complete"]:
        return str(search["measured"])
    upper = f", < {search['upper']}" if search["upper"] is not None else ""
    return f">= {search['measured']}{upper} (cut short: {search['stop_reason']})"


def maxbatch_markdown(e2e: dict) -> str:
    """Measured largest batch vs ``tuner plan``'s prediction for the same memory, with every probe."""
    pols = [p for p in e2e.get("policies", []) if "maxbatch" in p]
    if not pols:
        return f"No max-batch result ({e2e.get('error') or 'the step did not get that far'}).\n"
    mem = e2e.get("maxbatch_memory", {})
    full = _full(pols)
    f_meas = full["maxbatch"]["search"]["measured"] if full else None
    f_plan = full["maxbatch"]["planned"] if full else None
    lines = [f"Device memory for the search: {mem.get('bytes', 0) / 2**30:.2f} GiB ({mem.get('how', '?')}); "
             f"planned = `tuner plan --gpu-mem` (`tuner.memory.max_batch`, "
             f"backend {e2e['args']['backend']}). "
             + ("A probe allocates the engine's KV buffers for that batch and adds the planner's other terms "
                "(dry run: no memory to run out of)."
                if not str(e2e["args"]["device"]).startswith("cuda") else
                "A probe is one generation at that batch (warm-up 0, 1 run); "
                "OOM = torch.cuda.OutOfMemoryError."),
             "",
             "| policy | cache % | planned max batch | measured max batch | measured / planned "
             "| × full measured | × full planned | probes (batch: fits / OOM, s) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in pols:
        m = p["maxbatch"]
        s = m["search"]
        meas, plan = s["measured"], m["planned"]
        probes = ", ".join(f"{q['batch']}: {'fits' if q['fits'] else ('ERROR' if q['error'] else 'OOM')} "
                           f"{q['seconds']:.1f}" for q in s["probes"])
        ratio = f"{meas / plan:.2f}" if plan else "-"
        x_meas = f"{meas / f_meas:.2f}" if f_meas else "-"
        x_plan = f"{plan / f_plan:.2f}" if f_plan else "-"
        lines.append(f"| {p['name']} | {100 * p['fraction']:.2f} | {plan} | {_bounds(s)} | {ratio} | "
                     f"{x_meas} | {x_plan} | {probes} |")
    return "\n".join(lines) + "\n"


def e2e_targets(e2e: dict) -> list[dict]:
    """End-to-end speed-up and max-batch ratio of the best compressed policy (None: not measured)."""
    pols = e2e.get("policies", [])
    full = _full(pols)
    rows = []
    speed = [(p["bench"]["images_per_s"] / full["bench"]["images_per_s"], p["name"])
             for p in pols if p is not full and "bench" in p] if full and "bench" in full else []
    best = max(speed) if speed else None
    rows.append(dict(what=f"end to end: images/s at batch {e2e.get('args', {}).get('batch')}, "
                          f"best compressed / full >= {E2E_SPEEDUP_TARGET}",
                     measured=best[0] if best else None,
                     by=best[1] if best else None, limit=E2E_SPEEDUP_TARGET,
                     met=None if best is None else best[0] >= E2E_SPEEDUP_TARGET))
    ok = full is not None and "maxbatch" in full and full["maxbatch"]["search"]["measured"] > 0
    ratios = [(p["maxbatch"]["search"]["measured"] / full["maxbatch"]["search"]["measured"], p["name"])
              for p in pols if p is not full and "maxbatch" in p] if ok else []
    best = max(ratios) if ratios else None
    rows.append(dict(what=f"max batch: best compressed / full >= {MAXBATCH_TARGET}",
                     measured=best[0] if best else None, by=best[1] if best else None, limit=MAXBATCH_TARGET,
                     met=None if best is None else best[0] >= MAXBATCH_TARGET))
    return rows


def summary_markdown(head: list[str], steps: list[dict], mismatches: list[str], targets: list[dict], *,
                     dry_run: bool, total_s: float) -> str:
    """Steps, mismatches (the exit status) and targets (the finding)."""
    lines = list(head) + [f"Total {total_s:.0f} s. Exit status {'1' if mismatches else '0'}: "
                          f"{'see the mismatches below' if mismatches else 'no mismatch, every step ran'}.",
                          "", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['note']} |" for s in steps]
    lines += ["", "## Mismatches (any one makes the exit status 1)", ""]
    lines += [f"- {m}" for m in mismatches] or ["- none"]
    lines += ["", "## Targets (issue 20" + ("; DRY RUN: toy sizes on a CPU, meaningless" if dry_run else "")
              + ")", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        measured = "not measured" if t["measured"] is None else f"{t['measured']:.3f}" + \
            (f" ({t['by']})" if t.get("by") else "")
        met = "-" if t["met"] is None else ("yes" if t["met"] else f"NO (limit {t['limit']})")
        lines.append(f"| {t['what']} | {measured} | {met} |")
    lines += ["", "Tables: `kernels.md` (attention kernels), `e2e.md` (end to end, peak memory), "
              "`maxbatch.md` (measured vs planned max batch); raw data: `results.json`, `raw.tar.gz`."]
    return "\n".join(lines) + "\n"
