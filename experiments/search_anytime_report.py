"""Held-out measurement and report for experiments/search_anytime.py (incumbents vs images generated)."""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import platform
import shlex
import sys
from pathlib import Path


def _key(step: dict) -> str:
    return json.dumps([step["family"], step["params"]], sort_keys=True)


def measure(runs: list[dict], samples: int, seed: int, store: Path | None = None) -> None:
    """Per distinct incumbent: per-image PSNR on ``samples`` fresh images paired with the full cache,
    its mean ± SE and paired fid_vs_full, written into every step that holds it. ``store``: a file
    keeping the measurements across reruns (plain tensors and numbers, loaded with weights_only)."""
    import torch

    from tuner.policies.registry import make_policy
    from tuner.quality.evaluate import EvalSpec, build_evaluator
    from tuner.quality.metrics import frechet_distance, mean_and_se, psnr_per_image

    ev = spec = ref = None  # built on the first policy not in ``store``
    tag = f"{samples}@{seed}"
    cache: dict[str, dict] = {}
    if store is not None and store.is_file():
        cache = torch.load(store, weights_only=True).get(tag, {})
    for run in runs:
        for step in run["steps"]:
            key = _key(step)
            if key not in cache:
                if ev is None:
                    ev = build_evaluator("tiny", backend="torch")
                    spec = EvalSpec.balanced(ev.loaded.config.var.num_classes, samples, seed=seed,
                                             batch_size=64)
                    ref = ev.reference(spec)
                images, _, _ = ev.generate(make_policy(step["family"], step["params"]), spec)
                per = psnr_per_image(images, ref.images)
                psnr, se = mean_and_se(per)
                cache[key] = {"per_image": per, "psnr": float(psnr), "psnr_se": float(se),
                              "fid_vs_full": float(frechet_distance(ev.embed(images), ref.features))}
                print(f"held-out {step['family']}: {psnr:.2f} ± {se:.2f} dB ({len(cache)} policies)",
                      flush=True)
                if store is not None:
                    torch.save({tag: cache}, store)
            step.update(cache[key])


def paired(a, b) -> tuple[float, float]:
    d = (a - b).double()
    return float(d.mean()), float(d.std()) / math.sqrt(d.numel())


def images_to(run: dict, quality: float) -> int | None:
    """Images generated until the incumbent's held-out PSNR first reached ``quality`` (None: never)."""
    return next((s["images"] for s in run["steps"] if s["psnr"] >= quality), None)


def at_images(run: dict, images: int) -> dict | None:
    """The incumbent after ``images`` generated images (None before the first finished trial)."""
    held = [s for s in run["steps"] if s["images"] <= images]
    return held[-1] if held else None


def plot(path: Path, runs: list[dict], target: float, reference: str) -> None:
    """One colour per setting, one line style per seed; the dot is the exported winner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    order = list(dict.fromkeys(r["setting"] for r in runs))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run in runs:
        xs = [s["images"] for s in run["steps"]]
        ys = [s["psnr"] for s in run["steps"]]
        color = colors[order.index(run["setting"]) % len(colors)]
        first = run["seed"] == seeds[0]
        main = order.index(run["setting"]) == 0  # the default: drawn wide and underneath, so a setting
        # that follows the same path (same incumbents) stays visible on top of it
        ax.step(xs + [run["total_images"]], ys + ys[-1:], where="post", color=color,
                linewidth=3.0 if main else 1.1, alpha=0.6 if main else 1.0, zorder=1 if main else 2,
                linestyle=styles[seeds.index(run["seed"]) % len(styles)],
                label=run["setting"] if first else None)
        ax.plot(xs[-1], ys[-1], "o", color=color, markersize=4)
    ax.set_xscale("log")
    ax.axhline(target, color="gray", linewidth=0.8)
    ax.text(min(s["images"] for r in runs for s in r["steps"]), target,
            f" Q: {reference}'s exported quality", va="bottom", fontsize=8)
    ax.set_xlabel("images generated (screening, then final round; dot = exported; line style = seed)")
    ax.set_ylabel("incumbent's held-out PSNR (dB)")
    ax.set_title("tiny, tuner search --mem-target 15%: incumbent quality vs images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_agreement(rows: list[dict]) -> list[str]:
    """Lines on how the exported winners of one setting's seeds agree: held-out PSNR per seed, their
    spread against the mean SE, and every pair's paired difference."""
    import itertools
    import statistics

    wins = [r["steps"][-1] for r in rows]
    vals = [w["psnr"] for w in wins]
    se = sum(w["psnr_se"] for w in wins) / len(wins)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        m, e = paired(a["steps"][-1]["per_image"], b["steps"][-1]["per_image"])
        pairs.append((a["seed"], b["seed"], m, e))
    within_se = sum(abs(m) <= se for *_, m, _ in pairs)
    within_2p = sum(abs(m) <= 2 * e for *_, m, e in pairs)
    out = [f"- **{rows[0]['setting']}**: winners " + ", ".join(f"{v:.2f}" for v in vals)
           + f" dB (seeds {', '.join(str(r['seed']) for r in rows)}); spread over seeds (SD) {sd:.2f} dB "
           f"vs held-out SE {se:.2f} dB; range {max(vals) - min(vals):.2f} dB. Pairs within one held-out "
           f"SE: {within_se}/{len(pairs)}; within two paired SE: {within_2p}/{len(pairs)}."]
    out += [f"  - seed {a} − seed {b}: {m:+.3f} ± {e:.3f} dB (paired)" for a, b, m, e in pairs]
    return out


def write(out: Path, runs, args, wall, argv, previous, flags, seed, settings, reference="as filed") -> None:
    """``reference``: the setting whose exported quality is Q (the search the issue was filed against)."""
    out.mkdir(parents=True, exist_ok=True)
    ref = [r for r in runs if r["setting"] == reference]
    target = sum(r["steps"][-1]["psnr"] for r in ref) / len(ref)
    ref_total = sum(r["total_images"] for r in ref) / len(ref)
    with open(out / "anytime.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "seed", "images", "trial", "exported", "family", "screen_value", "psnr",
                    "psnr_se", "fid_vs_full", "params"])
        for r in runs:
            for st in r["steps"]:
                w.writerow([r["setting"], r["seed"], st["images"], st["trial"], bool(st.get("exported")),
                            st["family"], st["value"], f"{st['psnr']:.4f}", f"{st['psnr_se']:.4f}",
                            f"{st['fid_vs_full']:.4f}", json.dumps(st["params"], sort_keys=True)])
    plot(out / "anytime.png", runs, target, reference)
    cmd = "python -m experiments.search_anytime " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"# Images to quality: the default search vs the search as filed (tiny, 15% memory, "
        f"{len(set(r['seed'] for r in runs))} seeds)",
        "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, CPU; date "
        f"{dt.date.today().isoformat()}; wall time {wall / 60:.1f} min. Each search: `tuner search "
        f"{' '.join(flags)} --seed S` with its code's default flags; previous code = commit "
        f"`{previous}`; extra flags per setting: "
        + "; ".join(f"{k}: `{' '.join(v[1]) or '(none)'}` ({'this checkout' if v[0] == 'this' else previous})"
                    for k, v in settings.items() if k in args.settings)
        + f". Held-out: every incumbent on {args.held_out} fresh images (seed {seed}+j, batches "
        "of 64) paired with the full cache. Images count every generated image of the study (screening, "
        "then final round), not the calibration runs (16 images, cached per model, every side) or the "
        "proxy's record (4 images, cached per model, this checkout only).",
        "",
        f"Q = {target:.2f} dB: the held-out PSNR of the winners exported by the search {reference} (mean "
        f"of its seeds), which generated {ref_total:.0f} images on average to export them. The "
        "incumbent after N images is the best completed trial so far (what the search would export if "
        "stopped there), and the exported winner after the final round.",
        "",
        "| setting | seed | exported winner | held-out PSNR ± SE | paired fid_vs_full | screening images | "
        f"final-round images | images to Q | {reference} total / images to Q | incumbent at the "
        f"{reference} total (PSNR) |",
        "|" + "---|" * 10,
    ]
    for r in runs:
        win = r["steps"][-1]
        reach = images_to(r, target)
        ratio = f"{ref_total / reach:.1f}×" if reach else "never"
        inc = at_images(r, int(ref_total))
        inc_txt = f"{inc['psnr']:.2f} ± {inc['psnr_se']:.2f}" if inc else "none yet"
        lines.append(f"| {r['setting']} | {r['seed']} | {win['family']} (trial {win['trial']}) | "
                     f"{win['psnr']:.2f} ± {win['psnr_se']:.2f} | {win['fid_vs_full']:.3f} | "
                     f"{r['screen_images']} | {r['total_images'] - r['screen_images']} | "
                     f"{reach if reach else '—'} | {ratio} | {inc_txt} |")
    lines += ["", f"Paired differences of the exported winners on the same held-out images (each setting "
              f"minus the search {reference}, same seed):", ""]
    for d in [r for r in runs if r["setting"] != reference]:
        for p in [p for p in ref if p["seed"] == d["seed"]]:
            m, e = paired(d["steps"][-1]["per_image"], p["steps"][-1]["per_image"])
            lines.append(f"- {d['setting']} − {reference}, seed {d['seed']}: {m:+.3f} ± {e:.3f} dB")
    lines += ["", "Seed agreement of the exported winners:", ""]
    for name in dict.fromkeys(r["setting"] for r in runs):
        rows = [r for r in runs if r["setting"] == name]
        if len(rows) > 1:
            lines += seed_agreement(rows)
    lines += ["", "![incumbent quality vs images](anytime.png)"]
    from experiments.tiny_results import write_keeping_conclusion

    write_keeping_conclusion(out / "anytime.md", "\n".join(lines))
    print(f"wrote {out / 'anytime.md'}")
