"""``python -m varkv_kernels.bench``: compressed-cache attention vs full-cache SDPA over VAR's scales.

For each model (heads = depth, head_dim 64, 256px patch_nums), batch (rows = 2·batch with CFG) and
cache fraction, every scale's queries (``pn²`` tokens) attend to ``round(fraction · earlier tokens)``
cached tokens plus their own. Providers:

- ``sdpa_full``: ``F.scaled_dot_product_attention`` over all earlier tokens + the scale, read from
  one preallocated buffer (no concatenation; FlashAttention on a GPU) — the uncompressed baseline;
- ``torch``: :func:`varkv_kernels.dispatch.kv_attention` with the PyTorch reference on the compressed cache;
- ``triton``: the same op with the Triton kernel (on CPU only under ``TRITON_INTERPRET=1``).

Cache formats (``--formats``, :mod:`varkv_kernels.quant`): ``compute`` is the cache in the run's dtype
(the 16-bit cache with ``--dtype fp16/bf16``), measured by all three providers; ``int8`` / ``int4``
quantize the same cached tokens (equal kept tokens) and are measured by the compressed provider only
(``triton`` when it runs, else ``torch``), so the second table compares each format's latency and bytes
read with the ``compute`` cache's at the same provider.

Latency: ``triton.testing.do_bench`` medians on CUDA (warm-up call first, then the benchmarker's own
synchronized warm-up), ``perf_counter`` medians on CPU. Bytes = K/V of the keys read + q read + out
written (a quantized cache's K/V: its codes plus fp16 scales / zero points, :mod:`varkv_kernels.quant`);
``read_bytes`` leaves the output out. FLOPs = 4·R·H·Lq·keys·D. ``--quick`` runs tiny shapes (for CPU
and tests).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from varkv_kernels.quant import KV_FORMATS, format_info

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODEL_HEADS = {"d16": 16, "d20": 20, "d24": 24, "d30": 30}
HEAD_DIM = 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUICK = dict(models={"d2": 2}, batches=(1,), fractions=(1.0, 0.25), patch_nums=(1, 2, 3, 4))
CSV_FIELDS = ("model", "batch", "rows", "heads", "head_dim", "dtype", "fraction", "scale", "lq", "cache_len",
              "full_len", "provider", "kv_format", "ms", "read_bytes", "gb_per_s", "tflop_per_s")


def scale_shapes(patch_nums, fraction: float) -> list[tuple[int, int, int]]:
    """``(lq, cache_len, prefix)`` per scale: cache = ``round(fraction · prefix)`` earlier tokens."""
    out, prefix = [], 0
    for pn in patch_nums:
        lq = pn * pn
        out.append((lq, int(round(fraction * prefix)), prefix))
        prefix += lq
    return out


def traffic(rows: int, heads: int, lq: int, n_keys: int, d: int, elt: int) -> tuple[int, int]:
    """``(bytes, flops)`` of one attention call: K and V of ``n_keys`` keys, q and out of ``lq`` rows."""
    return elt * rows * heads * d * (2 * n_keys + 2 * lq), 4 * rows * heads * lq * n_keys * d


def format_traffic(rows: int, heads: int, lq: int, cache_len: int, d: int, elt: int,
                   fmt: str = "compute") -> tuple[int, int]:
    """``(read, written)`` bytes of one call over ``cache_len`` cached tokens stored in ``fmt``: the
    cache's K and V, the new tokens' K and V and q read (``elt`` bytes per unquantized element), out
    written. With ``fmt="compute"`` they sum to :func:`traffic` of ``cache_len + lq`` keys."""
    vector = format_info(fmt).vector_bytes(d, elt)
    read = rows * heads * (2 * cache_len * vector + 3 * lq * d * elt)
    return read, rows * heads * lq * d * elt


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median latency of ``fn()`` in ms after a warm-up call (which also compiles Triton kernels)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_ms(fn, reps)
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_event_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(reps, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_config(model: str, heads: int, batch: int, fraction: float, *, patch_nums, dtype, device, providers,
                 reps: int, formats=("compute",)) -> list[dict]:
    """CSV rows (one per scale, provider and cache format) for one (model, batch, fraction).

    ``compute`` rows come from every provider; each quantized format's from the compressed provider
    (``triton`` when in ``providers``, else ``torch``), over the same kept tokens quantized once.
    """
    from varkv_kernels.dispatch import kv_attention
    from varkv_kernels.quant import quantize

    gen = torch.Generator(device=device).manual_seed(0)
    rows, d, total = 2 * batch, HEAD_DIM, sum(p * p for p in patch_nums)

    def rand(*shape):  # drawn on the device: the d30 batch-64 buffers hold 167M values each
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    k_full, v_full = rand(rows, heads, total, d), rand(rows, heads, total, d)
    shapes = scale_shapes(patch_nums, fraction)
    cap = max(c for _, c, _ in shapes)
    k_cache, v_cache = k_full[:, :, :cap].clone(), v_full[:, :, :cap].clone()
    quantized = {f: (quantize(k_cache, f), quantize(v_cache, f)) for f in formats if f != "compute"}
    fast = "triton" if "triton" in providers else "torch"
    scale, elt = d ** -0.5, k_full.element_size()
    out = []
    for si, (lq, clen, prefix) in enumerate(shapes):
        q = rand(rows, heads, lq, d)
        k_new, v_new = k_full[:, :, prefix:prefix + lq], v_full[:, :, prefix:prefix + lq]
        lens = torch.full((rows, heads), clen, dtype=torch.int32, device=device)

        def compressed(kc, vc, backend):
            if backend == "torch":
                return lambda: kv_attention(q, kc, vc, lens, k_new, v_new, scale, backend="torch",
                                            uniform_len=clen)
            return lambda: kv_attention(q, kc, vc, lens, k_new, v_new, scale, backend="triton")

        # (provider, format, call, cached tokens read in that format)
        calls = [(name, "compute", compressed(k_cache, v_cache, name), clen) for name in providers
                 if name != "sdpa_full" and "compute" in formats]
        if "sdpa_full" in providers and "compute" in formats:
            calls.insert(0, ("sdpa_full", "compute", lambda: F.scaled_dot_product_attention(
                q, k_full[:, :, :prefix + lq], v_full[:, :, :prefix + lq], scale=scale), prefix))
        calls += [(fast, f, compressed(kq, vq, fast), clen) for f, (kq, vq) in quantized.items()]
        for name, fmt, fn, n_cached in calls:
            ms = time_ms(fn, device, reps)
            read, written = format_traffic(rows, heads, lq, n_cached, d, elt, fmt)
            flops = traffic(rows, heads, lq, n_cached + lq, d, elt)[1]
            out.append(dict(model=model, batch=batch, rows=rows, heads=heads, head_dim=d,
                            dtype=str(dtype).removeprefix("torch."), fraction=fraction, scale=si, lq=lq,
                            cache_len=clen, full_len=prefix + lq, provider=name, kv_format=fmt, ms=ms,
                            read_bytes=read, gb_per_s=(read + written) / ms / 1e6,
                            tflop_per_s=flops / ms / 1e9))
    return out


def _format_of(record: dict) -> str:
    return record.get("kv_format") or "compute"  # CSVs written before the formats existed: compute


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, batch, fraction): total ms over scales per provider, triton/sdpa_full ratio, GB/s.

    Only the ``compute`` cache's records count here; :func:`format_summary` compares the formats.
    """
    groups: dict[tuple, dict] = {}
    for r in (r for r in records if _format_of(r) == "compute"):
        g = groups.setdefault((r["model"], r["batch"], r["fraction"]), {"ms": {}, "bytes": {}, "flops": {}})
        g["ms"][r["provider"]] = g["ms"].get(r["provider"], 0.0) + r["ms"]
        g["bytes"][r["provider"]] = g["bytes"].get(r["provider"], 0.0) + r["gb_per_s"] * r["ms"] * 1e6
        g["flops"][r["provider"]] = g["flops"].get(r["provider"], 0.0) + r["tflop_per_s"] * r["ms"] * 1e9
    rows = []
    for (model, batch, fraction), g in groups.items():
        fast = "triton" if "triton" in g["ms"] else "torch"
        row = dict(model=model, batch=batch, fraction=fraction, ms=g["ms"], compressed=fast)
        ms = g["ms"].get(fast)
        base = g["ms"].get("sdpa_full")
        row["ratio"] = ms / base if ms is not None and base else float("nan")
        row["gb_per_s"] = g["bytes"][fast] / ms / 1e6 if ms else float("nan")
        row["tflop_per_s"] = g["flops"][fast] / ms / 1e9 if ms else float("nan")
        rows.append(row)
    return rows


def format_summary(records: list[dict]) -> list[dict]:
    """Per (model, batch, fraction, format) of the compressed provider (triton when measured, else torch):
    ms and bytes read summed over the scales, GB/s, and both as a ratio to the ``compute`` cache's at the
    same provider (NaN when that was not measured). Empty when no quantized format was measured."""
    if all(_format_of(r) == "compute" for r in records):
        return []
    groups: dict[tuple, dict] = {}
    for r in records:
        g = groups.setdefault((r["model"], r["batch"], r["fraction"]), {})
        cell = g.setdefault((r["provider"], _format_of(r)), {"ms": 0.0, "read": 0.0, "moved": 0.0})
        cell["ms"] += r["ms"]
        cell["read"] += float(r.get("read_bytes") or "nan")  # NaN: a CSV from before read_bytes
        cell["moved"] += r["gb_per_s"] * r["ms"] * 1e6
    rows = []
    for (model, batch, fraction), g in groups.items():
        fast = "triton" if any(p == "triton" for p, _ in g) else "torch"
        base = g.get((fast, "compute"))
        for fmt in KV_FORMATS:
            cell = g.get((fast, fmt))
            if cell is None:
                continue
            rows.append(dict(model=model, batch=batch, fraction=fraction, kv_format=fmt, provider=fast,
                             ms=cell["ms"], read_bytes=cell["read"],
                             gb_per_s=cell["moved"] / cell["ms"] / 1e6,
                             ms_ratio=cell["ms"] / base["ms"] if base else float("nan"),
                             read_ratio=cell["read"] / base["read"] if base else float("nan")))
    return rows


def format_markdown(rows: list[dict], first_cols: tuple[str, ...] = ("model", "batch")) -> str:
    """The cache-format table of :func:`format_summary` rows ("-": no compute cache to compare with)."""
    def num(x: float) -> str:
        return "-" if x != x else f"{x:.3f}"

    lines = ["| " + " | ".join(first_cols) + " | cache % | format | provider | ms | ms / compute | MB read "
             "| read / compute | GB/s |",
             "|" + "---|" * (len(first_cols) + 8)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in first_cols) + f" | {100 * r['fraction']:g} | "
                     f"{r['kv_format']} | {r['provider']} | {r['ms']:.4g} | {num(r['ms_ratio'])} | "
                     f"{r['read_bytes'] / 1e6:.4g} | {num(r['read_ratio'])} | {r['gb_per_s']:.4g} |")
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def markdown(summary: list[dict], providers, device: torch.device, dtype_name: str, argv,
             formats: list[dict] = ()) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        "# kv_attention benchmark", "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, triton {triton_version}, {dtype_name}, head_dim {HEAD_DIM}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{' '.join(['python -m varkv_kernels.bench', *argv])}`",
        "- latency = sum over the scales of one forward (one layer); ratio = compressed / sdpa_full;",
        "  GB/s and TFLOP/s of the compressed provider (triton when measured, else torch)", "",
        "| model | batch | cache % | " + " | ".join(f"{p} ms" for p in providers)
        + " | ratio | GB/s | TFLOP/s |",
        "|---|---|---|" + "---|" * len(providers) + "---|---|---|",
    ]
    for r in summary:
        cells = " | ".join(f"{r['ms'][p]:.4g}" if p in r["ms"] else "-" for p in providers)
        lines.append(f"| {r['model']} | {r['batch']} | {100 * r['fraction']:g} | {cells} | {r['ratio']:.3f} "
                     f"| {r['gb_per_s']:.4g} | {r['tflop_per_s']:.4g} |")
    if formats:
        lines += ["", "## Cache formats at equal kept tokens", "",
                  f"int8 / int4 caches vs the {dtype_name} (compute) cache: same tokens, same provider; "
                  "ms and MB read summed over the scales (MB read: cache K/V as stored, new K/V and q).", "",
                  format_markdown(formats).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["batch"]) for r in summary}):
        pts = sorted((100 * r["fraction"], r["ratio"]) for r in summary if (r["model"], r["batch"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} batch {key[1]}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("cache kept (%)")
    ax.set_ylabel("latency / full-cache SDPA")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_list(cast):
    def parse(text: str):
        try:
            return tuple(cast(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m varkv_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=_csv_list(str), default=("d16", "d20", "d30"))
    p.add_argument("--batches", type=_csv_list(int), default=(16, 64))
    p.add_argument("--fractions", type=_csv_list(float), default=(1.0, 0.5, 0.25, 0.15, 0.10))
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=5, help="CPU repetitions per measurement (median)")
    p.add_argument("--formats", type=_csv_list(str), default=KV_FORMATS,
                   help=f"cache formats, comma-separated subset of {','.join(KV_FORMATS)} (quantized ones: "
                        "compressed provider only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write kernels_bench.{md,csv,png} here")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_HEADS]
    if unknown and not args.quick:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_HEADS)}")
    if any(not 0.0 <= f <= 1.0 for f in args.fractions) or any(b < 1 for b in args.batches) or args.reps < 1:
        p.error("--fractions must lie in [0, 1], --batches and --reps must be positive")
    if not args.formats or any(f not in KV_FORMATS for f in args.formats):
        p.error(f"--formats {','.join(args.formats)}: use a comma-separated subset of {','.join(KV_FORMATS)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} requested but no CUDA GPU is visible; use --device cpu")
    return args


def main(argv=None) -> int:
    from varkv_kernels.dispatch import resolve_backend

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if args.quick:
        models, batches, fractions, patch_nums = QUICK["models"], QUICK["batches"], QUICK["fractions"], \
            QUICK["patch_nums"]
    else:
        models = {m: MODEL_HEADS[m] for m in args.models}
        batches, fractions, patch_nums = args.batches, args.fractions, PATCH_NUMS
    providers = ["sdpa_full", "torch"]
    try:
        if resolve_backend("triton", device) == "triton":
            providers.append("triton")
    except ValueError as exc:  # CPU without the interpreter: measure the reference only
        print(f"note: triton skipped ({exc})", file=sys.stderr)
    records = []
    for model, heads in models.items():
        for batch in batches:
            for fraction in fractions:
                records += bench_config(model, heads, batch, fraction, patch_nums=patch_nums,
                                        dtype=DTYPES[dtype_name], device=device, providers=providers,
                                        reps=args.reps, formats=args.formats)
    summary = summarize(records)
    table = markdown(summary, providers, device, dtype_name, argv, format_summary(records))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels_bench.md").write_text(table)
        with open(args.out / "kernels_bench.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(records)
        if summary:  # none with --formats int8,int4 only
            plot(summary, args.out / "kernels_bench.png", f"{device_name(device)}, {dtype_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
