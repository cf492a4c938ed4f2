"""The zero-generation quality proxy (tuner/quality/proxy.py) against held-out PSNR: Spearman ρ over many
policies of every family and storage format (issue 16 item 3).

    python -m experiments.proxy_rank                    # tiny, 256 images per policy -> experiments/search/
    python -m experiments.proxy_rank --report-only      # re-score proxy_rank.csv's policies (PSNR kept)

Policies: every family (window, sink_window, ams, scalekv, budgets) in each storage format (compute, int8,
int4 via ``kv_format``) fitted to 10 / 15 / 25 % memory exactly as the search fits them
(tuner.policies.fit), plus ``--random`` unfitted points of the families' parameter spaces (seeded), all
distinct compiled plans. Each gets its proxy score (one record of the full cache, ``ProxySpec()``: 4
labels, seed 0, cached by checkpoint hash) and its paired PSNR against the full cache on ``--samples``
held-out images (seed set A of experiments/tiny_results.py: batches seeded 1000 + j, disjoint from the
proxy's seed). ρ is reported overall and within each memory level (the search ranks candidates at one
memory target), for every aggregation in ``tuner.quality.proxy.AGGREGATIONS`` and for ranking by memory
fraction alone (the baseline). The PSNR halves (even / odd images) give PSNR's own rank reliability, the
ceiling of any proxy's ρ at this many images.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from experiments.proxy_rank_report import FAMILIES, format_name, write_report
from experiments.tiny_results import TARGETS, family_policies, seed_sets

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("compute", "int8", "int4")


def shapes(g) -> dict[str, tuple[str, dict]]:
    """Each family's fitted shape: tiny_results' four, and the joint family's cap form with score selection
    and layer weights that favour the first layers."""
    out = dict(family_policies())
    n = g.num_layers
    weights = [2.0 - 1.5 * layer / max(1, n - 1) for layer in range(n)]
    curve = [1.0] * (g.num_scales - 1)
    out["budgets"] = ("budgets", {"scale_curve": curve, "max_tokens": 1, "rule": "scores", "window_size": 8,
                                  "pool_kernel": 3, "layer_weights": weights})
    return out


def fit(ev, family: str, params: dict, target: float):
    """The policy with its knob fitted to ``target`` (the search's fitting), or None."""
    from tuner.mem_target import MemTarget
    from tuner.memory import as_geometry, memory_report
    from tuner.policies.fit import fit_to_memory
    from tuner.policies.registry import make_policy

    cfg, limit = ev.loaded.config, MemTarget(fraction=target)

    def fits(policy) -> bool:
        report = memory_report(policy, cfg, spec=ev.policy_spec(policy))
        return limit.fits(report.fraction, report.kv_bytes_per_image)

    return fit_to_memory(make_policy(family, params), as_geometry(cfg), fits)


def random_params(family: str, rng: random.Random, g) -> dict:
    """One point of the family's space (the shipped search spaces' ranges, scaled to the model)."""
    top = max(2, g.tokens_through(g.num_scales - 2))

    def log_int(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    if family == "window":
        return {"window": rng.randint(1, g.num_scales), "max_tokens": log_int(2, top)}
    if family == "sink_window":
        return {"sink_scales": rng.randint(1, 3), "window": rng.randint(1, g.num_scales),
                "max_tokens": log_int(2, top)}
    if family == "ams":
        w = rng.randint(0, 2)
        c_min = log_int(2, top // 2)
        return {"n_condensed": rng.randint(0, 3), "window": w, "window_demanding": w + rng.randint(0, 3),
                "theta_quantile": round(rng.uniform(0.1, 0.5), 3), "c_min": c_min,
                "c_max": int(c_min * rng.uniform(1.0, 3.0))}
    if family == "scalekv":
        return {"budget_fraction": round(math.exp(rng.uniform(math.log(0.02), math.log(0.5))), 4),
                "drafter_fraction": round(rng.uniform(0.0, 0.25), 3),
                "drafter_budget": round(rng.uniform(0.5, 1.0), 3), "window_size": log_int(4, 64),
                "pool_kernel": rng.choice([1, 3, 5, 7])}
    rule = rng.choice(["recent", "sink_recent", "scores"])
    out = {"scale_curve": [1.0] * (g.num_scales - 1), "max_tokens": log_int(2, top), "rule": rule}
    if rng.random() < 0.5:
        out["layer_weights"] = [round(math.exp(rng.uniform(math.log(0.25), math.log(4.0))), 3)
                                for _ in range(g.num_layers)]
    if rule == "sink_recent":
        out["sink_scales"] = rng.randint(1, 3)
    if rule == "scores":
        out.update(window_size=log_int(4, 64), pool_kernel=rng.choice([1, 3, 5, 7]))
    return out


def policies(ev, count_random: int, seed: int) -> list[dict]:
    """``{family, level, params}`` for every fitted and random policy, one per distinct compiled plan."""
    from tuner.memory import as_geometry
    from tuner.policies.registry import make_policy

    g = as_geometry(ev.loaded.config)
    found, seen = [], set()

    def add(policy, level: str) -> None:
        spec = ev.policy_spec(policy)
        plan = policy.plan(spec)
        key = json.dumps([plan.budgets, plan.full, plan.formats, policy.selection(g)], sort_keys=True)
        if key not in seen:
            seen.add(key)
            found.append({"family": policy.family, "level": level, "params": policy.params()})

    for target in TARGETS:
        for family, params in shapes(g).values():
            for fmt in FORMATS:
                fitted = fit(ev, family, {**params, "kv_format": fmt}, target)
                if fitted is not None:
                    add(fitted, f"{round(target * 100)}%")
    rng = random.Random(seed)
    while sum(1 for p in found if p["level"] == "random") < count_random:
        family = FAMILIES[sum(1 for p in found if p["level"] == "random") % len(FAMILIES)]
        fmt = rng.choice([*FORMATS, tuple(rng.choice(FORMATS) for _ in range(min(3, g.num_layers)))])
        try:
            add(make_policy(family, {**random_params(family, rng, g), "kv_format": fmt}), "random")
        except ValueError:
            continue  # a point the family cannot plan (e.g. too many condensed scales)
    return found


def score_all(ev, record, rows: list[dict]) -> None:
    """Proxy columns (every aggregation, lost mass, ms per score) of each row, in place."""
    from tuner.policies.registry import make_policy
    from tuner.quality.proxy import AGGREGATIONS, aggregate, proxy_score

    for row in rows:
        policy = make_policy(row["family"], row["params"])
        t0 = time.perf_counter()
        sc = proxy_score(record, policy, ev.policy_spec(policy))
        row["proxy_ms"] = 1000 * (time.perf_counter() - t0)
        row.update(score=sc.score, lost_mass=sc.lost_mass)
        n = record.geometry.scale_lengths
        row.update({f"agg_{name}": aggregate(sc.errors, sc.lost, n, name) for name in AGGREGATIONS})


def measure(ev, rows: list[dict], samples: int, batch_size: int) -> None:
    """Held-out paired PSNR (and its even / odd image halves) of each row, in place."""
    spec = seed_sets(ev.loaded.config.var.num_classes, samples, batch_size)[0]
    ref = ev.reference(spec).images.double()
    captured, generate = {}, ev.generate

    def capture(policy, s, **kw):
        out = generate(policy, s, **kw)
        captured["images"] = out[0]
        return out

    ev.generate = capture
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        m = ev.evaluate(row["family"], row["params"], spec)
        row["eval_s"] = time.perf_counter() - t0
        mse = (captured["images"].double() - ref).pow(2).flatten(1).mean(1)
        per_image = (-10 * torch.log10(mse.clamp_min(1e-300))).clamp(max=100.0)
        row.update(memory_fraction=m["memory_fraction"], psnr=m["psnr"], ssim=m["ssim"],
                   psnr_even=float(per_image[0::2].mean()), psnr_odd=float(per_image[1::2].mean()))
        print(f"[{i + 1}/{len(rows)}] {row['family']} {row['level']} mem {row['memory_fraction']:.3f} "
              f"psnr {row['psnr']:.2f} proxy {row.get('score', float('nan')):.3f}", flush=True)
    ev.generate = generate


COLUMNS = ["family", "format", "level", "memory_fraction", "psnr", "psnr_even", "psnr_odd", "ssim", "score",
           "lost_mass", "proxy_ms", "eval_s", "params"]


def write_csv(rows: list[dict], path: Path) -> None:
    aggs = sorted(k for k in rows[0] if k.startswith("agg_"))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + aggs)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in COLUMNS + aggs}, "params": json.dumps(r["params"]),
                        "format": format_name(r["params"].get("kv_format", "compute"))})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row = {"family": r["family"], "level": r["level"], "params": json.loads(r["params"]),
                   **{k: float(r[k]) for k in ("memory_fraction", "psnr", "psnr_even", "psnr_odd", "ssim")}}
            if r.get("eval_s"):
                row["eval_s"] = float(r["eval_s"])
            rows.append(row)
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--samples", type=int, default=256, help="held-out images per policy")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--random", type=int, default=20, help="unfitted random policies (on top of the fitted)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random policies")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--report-only", action="store_true",
                    help="re-score the policies of the existing CSV (PSNR columns kept), rewrite the report")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "search")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    from tuner.quality.evaluate import build_evaluator
    from tuner.quality.proxy import ProxySpec, load_or_record_proxy

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ev = build_evaluator(args.model)
    csv_path = args.out / "proxy_rank.csv"
    if args.report_only:
        rows = read_csv(csv_path)
    else:
        rows = policies(ev, args.random, args.seed)
        print(f"{len(rows)} distinct policies", flush=True)
    t_rec = time.perf_counter()
    record = load_or_record_proxy(ev.loaded.var, ev.loaded.vae, ev.loaded.config,  # recorded anew: timed
                                  checkpoint_sha256=ev.model_hash, spec=ProxySpec(), backend=ev.backend,
                                  recompute=True)
    record_s = time.perf_counter() - t_rec
    score_all(ev, record, rows)
    if not args.report_only:
        measure(ev, rows, args.samples, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, csv_path)
    facts = {"command": "python -m experiments.proxy_rank " + shlex.join(argv),
             "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch "
                        "thread(s), CPU (2 cores, shared)",
             "date": dt.date.today().isoformat(), "minutes": (time.time() - t0) / 60, "record_s": record_s,
             "samples": args.samples, "batch_size": args.batch_size, "report_only": args.report_only,
             "eval_s": statistics.median(r["eval_s"] for r in rows) if "eval_s" in rows[0] else None}
    write_report(rows, facts, args.out)


if __name__ == "__main__":
    main()
