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


def plot(path: Path, runs: list[dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    order = list(dict.fromkeys(r["setting"] for r in runs))
    for run in runs:
        xs = [s["images"] for s in run["steps"]]
        ys = [s["psnr"] for s in run["steps"]]
        style = styles[order.index(run["setting"]) % len(styles)]
        ax.step(xs + [run["total_images"]], ys + ys[-1:], where="post", linestyle=style,
                label=f"{run['setting']}, seed {run['seed']}")
        ax.plot(xs[-1], ys[-1], "o", color=ax.lines[-1].get_color())
    ax.axhline(target, color="gray", linewidth=0.8)
    ax.text(ax.get_xlim()[0], target, " Q: previous default's exported quality", va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("images generated (screening, then final round; dot = exported)")
    ax.set_ylabel("incumbent's held-out PSNR (dB)")
    ax.set_title("tiny, tuner search --mem-target 15%: incumbent quality vs images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, runs, args, wall, argv, previous, flags, seed, settings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prev = [r for r in runs if r["setting"] == "previous default"]
    target = sum(r["steps"][-1]["psnr"] for r in prev) / len(prev)
    prev_total = sum(r["total_images"] for r in prev) / len(prev)
    with open(out / "anytime.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "seed", "images", "trial", "exported", "family", "screen_value", "psnr",
                    "psnr_se", "fid_vs_full", "params"])
        for r in runs:
            for s in r["steps"]:
                w.writerow([r["setting"], r["seed"], s["images"], s["trial"], bool(s.get("exported")),
                            s["family"], s["value"], f"{s['psnr']:.4f}", f"{s['psnr_se']:.4f}",
                            f"{s['fid_vs_full']:.4f}", json.dumps(s["params"], sort_keys=True)])
    plot(out / "anytime.png", runs, target)
    cmd = "python -m experiments.search_anytime " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Images to quality: the default search vs the previous default (tiny, 15% memory)",
        "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} {platform.system()}, CPU; date "
        f"{dt.date.today().isoformat()}; wall time {wall / 60:.1f} min. Each search: `tuner search "
        f"{' '.join(flags)} --seed S` with its code's default flags; previous default = commit "
        f"`{previous}`; extra flags per setting: "
        + "; ".join(f"{k}: `{' '.join(v[1]) or '(none)'}`" for k, v in settings.items() if k in args.settings)
        + f". Held-out: every incumbent on {args.held_out} fresh images (seed {seed}+j, batches "
        "of 64) paired with the full cache. Images count every generated image of the study (screening, "
        "then final round), not the calibration runs (16 images, cached per model, both sides) or the "
        "proxy's record (4 images, cached per model, default only).",
        "",
        f"Q = {target:.2f} dB: the previous default's exported winners' held-out PSNR (mean of its "
        f"seeds). The previous default generated {prev_total:.0f} images on average to export them.",
        "",
        "| setting | seed | exported winner | held-out PSNR ± SE | paired fid_vs_full | screening images | "
        "final-round images | images to Q | previous total / images to Q | incumbent at the previous "
        "total (PSNR) |",
        "|" + "---|" * 10,
    ]
    for r in runs:
        win = r["steps"][-1]
        reach = images_to(r, target)
        ratio = f"{prev_total / reach:.1f}×" if reach else "never"
        inc = at_images(r, int(prev_total))
        inc_txt = f"{inc['psnr']:.2f} ± {inc['psnr_se']:.2f}" if inc else "none yet"
        lines.append(f"| {r['setting']} | {r['seed']} | {win['family']} (trial {win['trial']}) | "
                     f"{win['psnr']:.2f} ± {win['psnr_se']:.2f} | {win['fid_vs_full']:.3f} | "
                     f"{r['screen_images']} | {r['total_images'] - r['screen_images']} | "
                     f"{reach if reach else '—'} | {ratio} | {inc_txt} |")
    lines += ["", "Paired differences of the exported winners on the same held-out images (each setting "
              "minus the previous default, same seed; and the two seeds of each setting):", ""]
    for d in [r for r in runs if r["setting"] != "previous default"]:
        for p in [p for p in prev if p["seed"] == d["seed"]]:
            m, s = paired(d["steps"][-1]["per_image"], p["steps"][-1]["per_image"])
            lines.append(f"- {d['setting']} − previous default, seed {d['seed']}: {m:+.3f} ± {s:.3f} dB")
    for name in dict.fromkeys(r["setting"] for r in runs):
        a, b = [r for r in runs if r["setting"] == name][:2]
        m, s = paired(a["steps"][-1]["per_image"], b["steps"][-1]["per_image"])
        lines.append(f"- {name}: seed {a['seed']} − seed {b['seed']}: {m:+.3f} ± {s:.3f} dB")
    lines += ["", "![incumbent quality vs images](anytime.png)"]
    from experiments.tiny_results import write_keeping_conclusion

    write_keeping_conclusion(out / "anytime.md", "\n".join(lines))
    print(f"wrote {out / 'anytime.md'}")
