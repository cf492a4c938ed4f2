"""Where int4's quality loss comes from on tiny at 15%, and what else the same bytes could buy.

    python -m experiments.quant_anatomy                     # 1000 held-out images -> experiments/quant/
    python -m experiments.quant_anatomy --samples 64 --out /tmp/qa   # quick look

Issue 15 asks the searched joint policy to beat "preset + int4" at equal memory; on tiny it ties
(experiments/quant/results.md). This script measures why, on one policy shape: sink_window (2 sink
scales, window 7), the best preset + int4 at 15% (40 tokens per layer). Every row is the same shape
with another storage of K and V, paired with the full cache on seed set C (9000+j, the protocol of
experiments/tiny_results.py; the rows were chosen by probing the first 256 images of seed set A, so C
confirms them on seeds nobody looked at), with the paired PSNR difference to the int4 row and its
standard error:

- the stored formats at 40 tokens: 16-bit, int8, int4 (more memory than 15% except int4);
- K and V apart at 40 tokens (one of them int4, the other 16-bit), and at equal memory (29 tokens:
  one int8, the other int4, no more bytes than 40 int4 tokens);
- fewer bits for more tokens at equal memory: 3-bit (7 levels) at 50 tokens and 2-bit (3 levels)
  at 66 tokens, the token counts a packed 3- / 2-bit format with the same fp16 scale and zero point
  would hold;
- more bits for the attention sinks at equal memory: the first ``n`` kept tokens (sink_window keeps
  its sink scales first: 1 token of scale 0, 4 of scale 1, 9 of scale 2) stored int8 or 16-bit and
  the others int4, with as many tokens as fit in the bytes of 40 int4 tokens.

Formats the product does not have are *simulated*, in experiment code only: the cache holds 16-bit
buffers and each stored K or V is replaced by its round trip through the product's quantizer
(``varkv_kernels.quant``; fewer levels for 3/2 bits) when it is written. The first row checks the
simulation: simulated int4 on both K and V must give exactly the images of the real int4 cache.
Memory fractions are those of the formats named (docs/design.md, Memory), not of the 16-bit
buffers the simulation runs in. Writes anatomy.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from experiments.quant_results import per_image_psnr
from experiments.tiny_results import seed_sets
from tuner.quality.evaluate import build_evaluator

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"sink_scales": 2, "window": 7}  # sink_window's shape of experiments/tiny_results.py
# name, K storage, V storage, tokens per layer[, (first n tokens, their storage)]: storage is
# "int4"/"int8" (real or simulated), "int3"/"int2" (simulated: 7 / 3 levels) or None (16-bit)
ROWS = (
    ("int4 K+V, real (reference)", "real-int4", "real-int4", 40),
    ("int4 K+V, simulated (check)", "int4", "int4", 40),
    ("16-bit K+V", None, None, 40),
    ("int8 K+V", "int8", "int8", 40),
    ("K 16-bit, V int4", None, "int4", 40),
    ("K int4, V 16-bit", "int4", None, 40),
    ("K int4, V int8 (equal memory)", "int4", "int8", 29),
    ("K int8, V int4 (equal memory)", "int8", "int4", 29),
    ("3-bit K+V (equal memory, simulated)", "int3", "int3", 50),
    ("2-bit K+V (equal memory, simulated)", "int2", "int2", 66),
    ("first token int8, rest int4 (equal memory)", "int4", "int4", 39, (1, "int8")),
    ("first 5 tokens int8, rest int4 (equal memory)", "int4", "int4", 36, (5, "int8")),
    ("first 14 tokens int8, rest int4 (equal memory)", "int4", "int4", 30, (14, "int8")),
    ("first 5 tokens 16-bit, rest int4 (equal memory)", "int4", "int4", 29, (5, None)),
)
LEVELS = {"int4": 15, "int3": 7, "int2": 3}
# bytes of one stored (token, head) vector of head_dim D: 16-bit 2D; int8 D + fp16 scale; intB
# B·D/8 + fp16 scale and zero point (docs/design.md, Storage formats)
VECTOR_BYTES = {None: lambda d: 2 * d, "int8": lambda d: d + 2, "int4": lambda d: d // 2 + 4,
                "real-int4": lambda d: d // 2 + 4, "int3": lambda d: 3 * d // 8 + 4,
                "int2": lambda d: d // 4 + 4}


def memory_fraction(cfg, k_fmt, v_fmt, tokens: int, prefix=None) -> float:
    """The row's KV bytes over the full 16-bit cache's: the 16-bit workspace of the current scale
    (what the planner counts for this shape) plus ``tokens`` stored K and V vectors per layer, head and
    CFG row (``prefix`` = (n, storage): the first n of them in that storage, K and V alike). Checked
    against the planner for the formats the product has."""
    from tuner.memory import memory_report
    from tuner.policies.registry import make_policy

    g = cfg.geometry
    full16 = memory_report(make_policy("sink_window", {**SHAPE, "max_tokens": tokens}), cfg)
    per_vector = g.num_layers * 2 * g.num_heads  # layers × CFG rows × heads, for K and for V each
    workspace = full16.kv_bytes_per_image - tokens * per_vector * 2 * VECTOR_BYTES[None](g.head_dim)
    stored = tokens * per_vector * (VECTOR_BYTES[k_fmt](g.head_dim) + VECTOR_BYTES[v_fmt](g.head_dim))
    if prefix is not None:  # the first n tokens cost their own storage instead of the row's
        n, fmt = prefix
        stored += n * per_vector * 2 * VECTOR_BYTES[fmt](g.head_dim)
        stored -= n * per_vector * (VECTOR_BYTES[k_fmt](g.head_dim) + VECTOR_BYTES[v_fmt](g.head_dim))
    fraction = (workspace + stored) / full16.full_kv_bytes_per_image
    if k_fmt == v_fmt and k_fmt in (None, "int8", "real-int4") and prefix is None:
        fmt = {"kv_format": "int4" if k_fmt == "real-int4" else k_fmt} if k_fmt else {}
        planned = memory_report(make_policy("sink_window", {**SHAPE, "max_tokens": tokens, **fmt}), cfg)
        assert math.isclose(planned.fraction, fraction, rel_tol=1e-12), (k_fmt, planned.fraction, fraction)
    return fraction


def round_trip(x: torch.Tensor, fmt: str | None) -> torch.Tensor:
    """``x`` ``[R, H, n, D]`` through the product's quantizer (int8), or its asymmetric min/max rule
    with ``LEVELS[fmt]`` levels (int4 exactly; int3/int2 the same rule with fewer levels)."""
    from varkv_kernels.quant import SIDE_DTYPE, dequantize, quantize

    if fmt is None:
        return x
    if fmt == "int8":
        return dequantize(quantize(x, "int8"), torch.float32).to(x.dtype)
    levels, xf = float(LEVELS[fmt]), x.float()
    z = xf.amin(dim=-1).to(SIDE_DTYPE)
    s = ((xf.amax(dim=-1) - z.float()) / levels).to(SIDE_DTYPE)
    sf, zf = s.float()[..., None], z.float()[..., None]
    q = torch.where(sf > 0, (xf - zf) / sf.clamp_min(1e-30), 0.0).round_().clamp_(0, levels)
    return (q * sf + zf).to(x.dtype)


@contextmanager
def simulated_storage(k_fmt: str | None, v_fmt: str | None, prefix=None):
    """Every K (V) the cache stores is replaced by its round trip in ``k_fmt`` (``v_fmt``); with
    ``prefix = (n, storage)`` the tokens written to buffer positions below ``n`` by theirs instead.

    The cache writes a layer's K then its V through the same three ``kv_store`` calls (``write``,
    ``compact_shared``, ``compact_per_head``; tuner/model/cache.py), so the calls alternate K, V;
    nested calls (``compact_shared`` writes through ``write``) pass untouched. The reference row
    checks this reading against the real int4 cache. Positions: ``write`` stores at ``where``,
    ``compact_shared`` after the ``len(where)`` survivors it keeps in front (sink_window's sinks are
    its oldest tokens, so they stay at positions ``0..n-1``); sink_window never calls
    ``compact_per_head``.
    """
    from tuner.model import kv_store

    originals = {name: getattr(kv_store, name) for name in ("write", "compact_shared", "compact_per_head")}
    state = {"calls": 0, "depth": 0}

    def wrap(fn):
        def stored(buf, where, x, *rest):
            if state["depth"]:
                return fn(buf, where, x, *rest)
            fmt = k_fmt if state["calls"] % 2 == 0 else v_fmt
            state["calls"] += 1
            state["depth"] += 1
            start = where if isinstance(where, int) else int(where.numel())
            try:
                return fn(buf, where, stored_as(x, start, fmt), *rest)
            finally:
                state["depth"] -= 1
        return stored

    def stored_as(x, start: int, fmt):
        out = round_trip(x, fmt)
        if prefix is not None and start < prefix[0]:
            head = min(prefix[0] - start, x.shape[2])
            out[:, :, :head] = round_trip(x[:, :, :head], prefix[1])
        return out

    for name, fn in originals.items():
        setattr(kv_store, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(kv_store, name, fn)


def measure(ev, spec, k_fmt, v_fmt, tokens: int, prefix=None) -> tuple[torch.Tensor, dict]:
    """Images and metrics of sink_window at ``tokens`` per layer with the storage named."""
    real = k_fmt == "real-int4"
    params = {**SHAPE, "max_tokens": tokens, **({"kv_format": "int4"} if real else {})}
    captured = {}
    generate = ev.generate

    def capture(policy, s, **kw):
        out = generate(policy, s, **kw)
        captured["images"] = out[0]
        return out

    ev.generate = capture
    try:
        with simulated_storage(None if real else k_fmt, None if real else v_fmt, prefix):
            metrics = ev.evaluate("sink_window", params, spec)
    finally:
        ev.generate = generate
    return captured["images"], metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000, help="held-out images")
    p.add_argument("--seed-set", choices=("A", "B", "C"), default="C",
                   help="seed set of experiments/tiny_results.py (A = 1000+j, B = 5000+j, C = 9000+j)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "quant")
    args = p.parse_args(argv)
    t0 = time.time()
    ev = build_evaluator("tiny", backend="torch")
    sets = seed_sets(ev.loaded.config.var.num_classes, args.samples, args.batch_size)
    spec = sets["ABC".index(args.seed_set)]
    full = ev.reference(spec).images
    rows, base = [], None
    for name, k_fmt, v_fmt, tokens, *prefix in ROWS:
        prefix = prefix[0] if prefix else None
        memory = memory_fraction(ev.loaded.config, k_fmt, v_fmt, tokens, prefix)
        images, metrics = measure(ev, spec, k_fmt, v_fmt, tokens, prefix)
        psnr = per_image_psnr(images, full)
        if base is None:
            base, base_images = psnr, images
        elif k_fmt == v_fmt == "int4" and tokens == 40 and not torch.equal(images, base_images):
            raise SystemExit("the simulated int4 storage does not reproduce the real int4 cache")
        diff = psnr - base
        rows.append((name, memory, tokens, float(psnr.mean()), float(diff.mean()),
                     float(diff.std() / math.sqrt(len(diff))), metrics.get("fid_vs_full")))
        print(f"{name:38s} {float(psnr.mean()):6.2f} dB  {float(diff.mean()):+.2f} ± "
              f"{float(diff.std() / math.sqrt(len(diff))):.2f}", flush=True)
    write(rows, args, time.time() - t0)


def write(rows, args, seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m experiments.quant_anatomy" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    lines = [
        "# Where int4's loss comes from (tiny, sink_window at 15%)", "",
        f"Command: `{cmd}`; machine: {platform.machine()} {platform.system()}, CPU, "
        f"{torch.get_num_threads()} torch threads; date {dt.date.today()}; wall time {seconds / 60:.1f} min. "
        f"{args.samples} held-out images (seed set {args.seed_set} of experiments/tiny_results.py), each "
        "paired with the full cache on its seed. Δ: paired PSNR difference to the first row, ± its "
        "standard error. Memory: fraction of the full 16-bit cache of the storage named (3-/2-bit formats "
        "and a prefix in another format do not exist in the product: those rows are simulated, see the "
        "script's docstring). The second row reproduces the first exactly (checked: equal images), which "
        "validates the simulation.", "",
        "| storage | memory | tokens/layer | PSNR (dB) | Δ vs int4 (dB) | fid_vs_full |",
        "|---|---|---|---|---|---|"]
    for name, memory, tokens, psnr, diff, se, fid in rows:
        fid_text = f"{fid:.3f}" if fid is not None else "–"
        lines.append(f"| {name} | {100 * memory:.1f}% | {tokens} | {psnr:.2f} | {diff:+.2f} ± {se:.2f} "
                     f"| {fid_text} |")
    path = args.out / "anatomy.md"
    keep = ""
    if path.is_file() and "\n## Reading\n" in path.read_text():
        keep = "\n## Reading\n" + path.read_text().split("\n## Reading\n", 1)[1]
    path.write_text("\n".join(lines) + "\n" + keep)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
