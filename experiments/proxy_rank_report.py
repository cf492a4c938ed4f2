"""proxy_rank.md and proxy_rank.png from the rows of experiments/proxy_rank.py, and the rank statistics
(kept apart from the measurement so that each file has one job)."""
from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Callable

FAMILIES = ("window", "sink_window", "ams", "scalekv", "budgets")
MARKERS = {"compute": "o", "int8": "s", "int4": "^", "mixed": "D"}
LEVELS = ("10%", "15%", "25%", "random")
BOOTSTRAP = 1000
CONCLUSION = "<!-- hand-written conclusion below: kept when the report is regenerated -->"


def format_name(kv_format) -> str:
    return kv_format if isinstance(kv_format, str) else "mixed"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ (Pearson correlation of average ranks, ties shared)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var > 0 else float("nan")


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out = {"all": rows}
    out.update({level: [r for r in rows if r["level"] == level] for level in LEVELS})
    return out


def rankers(rows: list[dict]) -> list[tuple[str, Callable[[dict], float]]]:
    """``(name, f)`` with ``f(row)`` higher = better predicted quality: every aggregation of the proxy
    (negated: lower proxy = better), then the two baselines: storage format alone (int4 > int8 > compute,
    layer groups averaged) and memory fraction alone (last)."""
    aggs = sorted(k for k in rows[0] if k.startswith("agg_"))
    out: list[tuple[str, Callable[[dict], float]]] = [(k[4:], lambda r, k=k: -r[k]) for k in aggs]
    out.append(("storage format alone (baseline)", format_rank))
    out.append(("memory fraction alone (baseline)", lambda r: r["memory_fraction"]))
    return out


def format_rank(row: dict) -> float:
    """int4 2, int8 1, compute 0 (layer groups: the mean): at one memory, fewer bits keep more tokens."""
    code = {"compute": 0, "int8": 1, "int4": 2}
    fmt = row["params"].get("kv_format", "compute")
    return code[fmt] if isinstance(fmt, str) else statistics.fmean(code[f] for f in fmt)


def rhos(rows: list[dict], f: Callable[[dict], float]) -> dict[str, float]:
    """ρ(f, PSNR) overall, per level, ``within`` (the mean over the three fitted levels) and ``cell``
    (the mean over the fitted (level, format) cells: ranking the families at one memory and format)."""
    out = {g: spearman([f(r) for r in rs], [r["psnr"] for r in rs]) for g, rs in groups(rows).items()}
    out["within"] = statistics.fmean(out[level] for level in LEVELS[:3])
    cells = [[r for r in rows if r["level"] == level and r["params"].get("kv_format", "compute") == fmt]
             for level in LEVELS[:3] for fmt in ("compute", "int8", "int4")]
    vals = [spearman([f(r) for r in c], [r["psnr"] for r in c]) for c in cells]
    vals = [v for v in vals if not math.isnan(v)]
    out["cell"] = statistics.fmean(vals) if vals else float("nan")
    return out


def bootstrap(rows: list[dict], fs: list[Callable[[dict], float]], n: int = BOOTSTRAP,
              seed: int = 0) -> list[list[tuple[float, float]]]:
    """Per resample (policies drawn with replacement within each level), ``(all, within)`` ρ of every f."""
    rng = random.Random(seed)
    by_level = groups(rows)
    out = []
    for _ in range(n):
        sample = [r for level in LEVELS for r in rng.choices(by_level[level], k=len(by_level[level]))]
        stats = [rhos(sample, f) for f in fs]
        out.append([(s["all"], s["within"]) for s in stats])
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """The central 95% of ``values``."""
    v = sorted(x for x in values if not math.isnan(x))
    return v[int(0.025 * (len(v) - 1))], v[int(0.975 * (len(v) - 1))]


def split_half(rows: list[dict]) -> dict[str, float]:
    """ρ between the PSNR of the even and of the odd images, per group."""
    out = {g: spearman([r["psnr_even"] for r in rs], [r["psnr_odd"] for r in rs])
           for g, rs in groups(rows).items()}
    out["within"] = statistics.fmean(out[level] for level in LEVELS[:3])
    return out


def scipy_check(rows: list[dict]) -> str:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return "scipy is not installed; ρ computed by experiments/proxy_rank.spearman (average ranks)."
    ours = spearman([-r["score"] for r in rows], [r["psnr"] for r in rows])
    theirs = float(spearmanr([-r["score"] for r in rows], [r["psnr"] for r in rows]).statistic)
    return (f"ρ computed by experiments/proxy_rank_report.spearman (average ranks); scipy.stats.spearmanr "
            f"(installed here as a dependency of another package) agrees on the overall ρ ({ours:.6f} vs "
            f"{theirs:.6f}).")


def _f(v, d=3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def short_params(params: dict) -> str:
    p = {k: v for k, v in params.items() if v is not None and k != "kv_format"}
    if "layer_weights" in p:
        p["layer_weights"] = [round(w, 2) for w in p["layer_weights"]]
    if p.get("scale_curve") and all(c == 1.0 for c in p["scale_curve"]):
        p.pop("scale_curve")
    fmt = params.get("kv_format", "compute")
    return json.dumps(p, separators=(",", ":")) + ("" if isinstance(fmt, str) else f" formats {list(fmt)}")


def rho_lines(rows: list[dict], chosen: str) -> list[str]:
    """The ρ table: every ranker with bootstrap intervals, then PSNR's own split-half reliability."""
    named = rankers(rows)
    boot = bootstrap(rows, [f for _, f in named])
    base = len(named) - 1  # the memory baseline is last
    lines = ["| ranking by | all | 10% | 15% | 25% | random | mean within 10/15/25% | mean within level × "
             "format | 95% interval: all | 95% interval: within | within − memory baseline (95%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (name, f) in enumerate(named):
        v = rhos(rows, f)
        lo_a, hi_a = interval([b[i][0] for b in boot])
        lo_w, hi_w = interval([b[i][1] for b in boot])
        gain = "" if i == base else "{:+.3f} ({:+.3f} … {:+.3f})".format(
            v["within"] - rhos(rows, named[base][1])["within"],
            *interval([b[i][1] - b[base][1] for b in boot]))
        bold = "**" if name == chosen else ""
        cols = " | ".join(_f(v[g]) for g in ("all", *LEVELS, "within", "cell"))
        lines.append(f"| {bold}{name}{bold} | {cols} | {lo_a:.3f} … {hi_a:.3f} | {lo_w:.3f} … {hi_w:.3f} "
                     f"| {gain} |")
    half = split_half(rows)
    brown = {g: 2 * x / (1 + x) for g, x in half.items()}
    for name, v in (("PSNR of the even vs the odd images (split half)", half),
                    ("… Spearman-Brown to all images (PSNR's own reliability)", brown)):
        lines.append(f"| {name} | " + " | ".join(_f(v[g]) for g in ("all", *LEVELS, "within")) + " | | | | |")
    return lines


def write_report(rows: list[dict], facts: dict, out: Path) -> None:
    from tuner.quality.proxy import SCORE

    counts = {g: len(rs) for g, rs in groups(rows).items()}
    chosen = rhos(rows, dict(rankers(rows))[SCORE])
    rest = sorted(r["proxy_ms"] for r in rows[1:])
    only = " (report only: PSNR columns from the previous run, proxy re-scored)" \
        if facts["report_only"] else ""
    gen = f" Generating the {facts['samples']} PSNR images of one policy took {facts['eval_s']:.0f} s." \
        if facts.get("eval_s") else ""
    lines = [
        "# Zero-generation proxy vs held-out PSNR (tiny)", "",
        f"Command: `{facts['command'].strip()}`; machine: {facts['machine']}; date {facts['date']}; "
        f"wall time {facts['minutes']:.1f} min{only}. "
        f"{counts['all']} distinct policies ({', '.join(f'{counts[lv]} at {lv}' for lv in LEVELS)}); "
        f"PSNR paired with the full cache on {facts['samples']} held-out images (seed set A of "
        "experiments/tiny_results.py: balanced labels, batches of "
        f"{facts['batch_size']} seeded 1000 + j); the proxy records 4 labels with seed 0 (`ProxySpec()`).",
        "",
        f"Proxy cost on this CPU: record {facts['record_s']:.2f} s (4 full-cache images, both CFG rows, "
        f"fp32; cached on disk afterwards); score {statistics.median(rest):.0f} ms median, "
        f"{rest[-1]:.0f} ms max per policy; the first score of a record also replays the full cache once "
        f"({rows[0]['proxy_ms']:.0f} ms)." + gen, "",
        f"**Chosen score: `{SCORE}`**: ρ = {chosen['all']:.3f} overall, {chosen['10%']:.3f} / "
        f"{chosen['15%']:.3f} / {chosen['25%']:.3f} within the 10 / 15 / 25 % levels (mean "
        f"{chosen['within']:.3f}), {chosen['random']:.3f} over the random points. {scipy_check(rows)}", "",
        "## Spearman ρ(−proxy, PSNR)", "",
        "Rows: every aggregation of the per-(layer, scale) tables (tuner/quality/proxy.py `AGGREGATIONS`), "
        "two baselines that need no proxy (rank by storage format alone: int4 > int8 > compute, since at one "
        "memory fewer bits keep more tokens; rank by memory fraction alone), and the rank reliability of "
        "PSNR itself at this many images (ρ between the PSNR of the even and of the odd images; the "
        "Spearman-Brown line extrapolates it to all images: a proxy cannot be expected to agree with "
        "measured PSNR much better than that). `mean within level × format`: the mean ρ over the nine "
        "fitted (level, format) cells of five policies each, i.e. ranking the families at one memory and "
        f"one format. Intervals: {BOOTSTRAP} bootstrap resamples of the policies (within each level).", ""]
    lines += rho_lines(rows, SCORE)
    lines += ["", "## Policies", "",
              "Sorted by level, then PSNR. `score` is the chosen aggregation; `lost` the mean full-cache "
              "attention mass on dropped history tokens.", "",
              "| family | format | level | memory | PSNR (dB) | score | lost | proxy ms | parameters |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (LEVELS.index(r["level"]), -r["psnr"])):
        fmt = format_name(r["params"].get("kv_format", "compute"))
        lines.append(f"| {r['family']} | {fmt} | {r['level']} | {_f(r['memory_fraction'])} | "
                     f"{_f(r['psnr'], 2)} | {_f(r['score'], 4)} | {_f(r['lost_mass'])} | "
                     f"{r['proxy_ms']:.0f} | `{short_params(r['params'])}` |")
    md = out / "proxy_rank.md"
    kept = md.read_text().split(CONCLUSION, 1)[1] if md.is_file() and CONCLUSION in md.read_text() else "\n"
    md.write_text("\n".join(lines) + f"\n\n{CONCLUSION}{kept}")
    plot(rows, out / "proxy_rank.png")
    print(md.read_text())


def plot(rows: list[dict], path: Path) -> None:
    """Left: proxy score vs PSNR, every policy. Right: the same within each memory level (both centred on the
    level's median), the ranking the search needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        fmt = format_name(r["params"].get("kv_format", "compute"))
        axes[0].scatter(r["score"], r["psnr"], color=colours[r["family"]], marker=MARKERS[fmt], s=36,
                        edgecolors="k" if r["level"] == "random" else "none", linewidths=0.8)
    for level in LEVELS[:3]:
        rs = [r for r in rows if r["level"] == level]
        ms = statistics.median(r["score"] for r in rs)
        mp = statistics.median(r["psnr"] for r in rs)
        for r in rs:
            fmt = format_name(r["params"].get("kv_format", "compute"))
            axes[1].scatter(r["score"] - ms, r["psnr"] - mp, color=colours[r["family"]], marker=MARKERS[fmt],
                            s=36)
    from tuner.quality.proxy import SCORE

    rho = rhos(rows, dict(rankers(rows))[SCORE])
    axes[0].set(xlabel=f"proxy score ({SCORE}, lower = better)", ylabel="held-out PSNR vs full cache (dB)",
                title=f"all policies: ρ = {rho['all']:.2f} (black edge: random points)")
    axes[1].set(xlabel="proxy score − level median", ylabel="PSNR − level median (dB)",
                title="within memory levels 10/15/25%: ρ = "
                + " / ".join(f"{rho[lv]:.2f}" for lv in LEVELS[:3]))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=colours[f], label=f) for f in FAMILIES]
    handles += [plt.Line2D([], [], ls="", marker=m, color="gray", label=f) for f, m in MARKERS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
