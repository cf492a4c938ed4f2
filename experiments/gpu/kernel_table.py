"""The kernel step: which ``python -m varkv_kernels.bench`` runs to make, and their CSVs as one table with the
targets.

A run is ``MODEL:DTYPE:BATCHES[:FORMATS]`` (``d30:bf16:16,64``), one ``varkv_kernels.bench`` process each, so
a run that hits its time limit loses only itself; ``quick:DTYPE[:FORMATS]`` is ``varkv_kernels.bench --quick``
(the dry run's toy shapes). FORMATS are the cache's storage formats (``varkv_kernels.bench --formats``):
``compute`` (the cache in DTYPE, fp16 or bf16: the 16-bit cache) by default, all of
``compute,int8,int4`` for a quick run. A quantized format is measured by the Triton kernel only, so a
run such as ``d30:bf16:64:int8,int4`` (100 timings: 5 cache fractions x 10 scales x 2 formats) adds
the int8 / int4 rows at batch 64, and the format table compares them with the ``compute`` cache's Triton
time and bytes read at the same (model, dtype, batch, cache %) from whichever run measured it (a row
measured by two runs counts once).

Targets (issue 20, H100-class, d30, batch 64): the compressed-cache Triton kernel's attention time
over one forward's scales (one layer) at 15% cache <= 0.35x the full-cache SDPA time, at 100% <= 1.1x.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

# varkv_kernels.quant.KV_FORMATS, restated so that the driver does not import torch (a test keeps them equal).
KV_FORMATS = ("compute", "int8", "int4")

FRACTIONS = (1.0, 0.5, 0.25, 0.15, 0.10)
TARGETS = {0.15: 0.35, 1.0: 1.1}  # cache fraction -> largest allowed triton / sdpa_full ratio
BIG_SCALE = 64  # scales with at least this many queries carry the time; their worst ratio is shown too


@dataclass(frozen=True)
class KernelRun:
    model: str  # d16 ... d30, or "quick"
    dtype: str
    batches: tuple[int, ...] = ()
    formats: tuple[str, ...] = ("compute",)

    @property
    def label(self) -> str:
        default = KV_FORMATS if self.model == "quick" else ("compute",)
        fmts = "" if self.formats == default else "-" + "-".join(self.formats)
        return f"{self.model}-{self.dtype}" + (f"-b{'-'.join(map(str, self.batches))}" if self.batches
                                               else "") + fmts

    def command(self, python: str, out: Path, fractions=FRACTIONS, device: str = "cuda") -> list[str]:
        cmd = [python, "-m", "varkv_kernels.bench", "--device", device, "--dtype", self.dtype,
               "--out", str(out), "--formats", ",".join(self.formats)]
        if self.model == "quick":
            return cmd + ["--quick", "--reps", "1"]
        return cmd + ["--models", self.model, "--batches", ",".join(map(str, self.batches)),
                      "--fractions", ",".join(f"{f:g}" for f in fractions)]


def _formats(part: str, text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    fmts = tuple(f.strip() for f in text.split(",") if f.strip())
    if not fmts or any(f not in KV_FORMATS for f in fmts):
        raise ValueError(f"kernel run {part!r}: formats must be a comma-separated subset of "
                         f"{','.join(KV_FORMATS)}")
    return fmts


def parse_runs(text: str) -> list[KernelRun]:
    """``"d30:bf16:16,64;d30:bf16:64:int8,int4;quick:bf16"`` -> runs (ValueError with the expected form)."""
    runs = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        bits = part.split(":")
        if bits[0] == "quick" and len(bits) in (2, 3):
            fmts = _formats(part, bits[2] if len(bits) == 3 else None, KV_FORMATS)
            runs.append(KernelRun("quick", bits[1], formats=fmts))
            continue
        if len(bits) not in (3, 4) or not bits[2]:
            raise ValueError(f"kernel run {part!r}: expected MODEL:DTYPE:BATCHES[:FORMATS] (d30:bf16:16,64 "
                             f"or d30:bf16:64:int8,int4) or quick:DTYPE[:FORMATS]")
        try:
            batches = tuple(int(b) for b in bits[2].split(","))
        except ValueError:
            raise ValueError(f"kernel run {part!r}: BATCHES must be comma-separated integers") from None
        fmts = _formats(part, bits[3] if len(bits) == 4 else None, ("compute",))
        runs.append(KernelRun(bits[0], bits[1], batches, fmts))
    if not runs:
        raise ValueError("no kernel runs given")
    return runs


def read_rows(csv_path: Path) -> list[dict]:
    """varkv_kernels.bench's CSV with numbers as numbers."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("batch", "rows", "heads", "head_dim", "scale", "lq", "cache_len", "full_len"):
            r[k] = int(r[k])
        for k in ("fraction", "ms", "gb_per_s", "tflop_per_s"):
            r[k] = float(r[k])
        r["kv_format"] = r.get("kv_format") or "compute"  # CSVs from before the formats: compute only
        if r.get("read_bytes"):
            r["read_bytes"] = int(r["read_bytes"])
    return rows


def _unique(rows: list[dict]) -> list[dict]:
    """The first of the rows that two runs both measured (same model, dtype, batch, cache %, scale,
    provider and format), so sums over scales count every timing once."""
    seen, out = set(), []
    for r in rows:
        key = (r["model"], r["dtype"], r["batch"], r["fraction"], r["scale"], r["provider"], r["kv_format"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (model, dtype, batch, fraction): varkv_kernels.bench's summary plus the worst big-scale
    ratio (``kind`` "latency", the compute cache), then the cache-format rows of varkv_kernels.bench's
    ``format_summary`` (``kind`` "format"; present when a quantized format was measured)."""
    from varkv_kernels.bench import format_summary
    from varkv_kernels.bench import summarize as bench_summarize

    rows = _unique(rows)
    out, formats = [], []
    for dtype in sorted({r["dtype"] for r in rows}):
        part = [r for r in rows if r["dtype"] == dtype]
        formats += [dict(f, dtype=dtype, kind="format") for f in format_summary(part)]
        part = [r for r in part if r["kv_format"] == "compute"]
        for s in bench_summarize(part):
            per_scale = {}
            for r in part:
                if (r["model"], r["batch"], r["fraction"]) == (s["model"], s["batch"], s["fraction"]) \
                        and r["lq"] >= BIG_SCALE:
                    per_scale.setdefault(r["scale"], {})[r["provider"]] = r["ms"]
            ratios = [p[s["compressed"]] / p["sdpa_full"] for p in per_scale.values()
                      if s["compressed"] in p and p.get("sdpa_full")]
            out.append(dict(s, dtype=dtype, kind="latency",
                            worst_big_scale=max(ratios) if ratios else float("nan")))
    order = {f: i for i, f in enumerate(KV_FORMATS)}
    return (sorted(out, key=lambda s: (s["model"], s["dtype"], s["batch"], -s["fraction"]))
            + sorted(formats, key=lambda s: (s["model"], s["dtype"], s["batch"], -s["fraction"],
                                             order[s["kv_format"]])))


def target_rows(summary: list[dict], model: str, batch: int) -> list[dict]:
    """The targets at ``model``/``batch`` for every dtype measured: measured ratio, limit, met (None: not
    measured)."""
    summary = [s for s in summary if s.get("kind", "latency") == "latency"]
    out = []
    for dtype in sorted({s["dtype"] for s in summary}) or ["-"]:
        for fraction, limit in sorted(TARGETS.items()):
            hit = [s for s in summary if (s["model"], s["batch"], s["dtype"]) == (model, batch, dtype)
                   and abs(s["fraction"] - fraction) < 1e-9 and s["compressed"] == "triton"]
            ratio = hit[0]["ratio"] if hit else None
            out.append(dict(what=f"kernel {model} batch {batch} {dtype}, {100 * fraction:g}% cache: triton / "
                                 f"full-cache SDPA <= {limit}", measured=ratio, limit=limit,
                            met=None if ratio is None else ratio <= limit))
    return out


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"  # NaN: no scale that large (the quick shapes)


def markdown(summary: list[dict]) -> str:
    """The kernel table (ms are sums over one forward's scales, one layer), then the cache-format table
    when a quantized format was measured."""
    from varkv_kernels.bench import format_markdown

    formats = [s for s in summary if s.get("kind") == "format"]
    summary = [s for s in summary if s.get("kind", "latency") == "latency"]
    providers = [p for p in ("sdpa_full", "torch", "triton") if any(p in s["ms"] for s in summary)]
    lines = ["| model | dtype | batch | cache % | " + " | ".join(f"{p} ms" for p in providers)
             + f" | triton / sdpa_full | worst scale (>= {BIG_SCALE} queries) | GB/s | TFLOP/s | target |",
             "|---|---|---|---|" + "---|" * len(providers) + "---|---|---|---|---|"]
    for s in summary:
        cells = " | ".join(f"{s['ms'][p]:.4g}" if p in s["ms"] else "-" for p in providers)
        limit = next((v for f, v in TARGETS.items() if abs(f - s["fraction"]) < 1e-9), None)
        target = "" if limit is None else f"<= {limit}: {'met' if s['ratio'] <= limit else 'MISSED'}"
        lines.append(f"| {s['model']} | {s['dtype']} | {s['batch']} | {100 * s['fraction']:g} | {cells} | "
                     f"{s['ratio']:.3f} | {_num(s['worst_big_scale'])} | {s['gb_per_s']:.4g} | "
                     f"{s['tflop_per_s']:.4g} | {target} |")
    if formats:
        lines += ["", "Cache formats at equal kept tokens: int8 / int4 vs the cache in the run's dtype "
                  "(`compute`), same provider; ms and MB read summed over the scales (MB read: cache K/V as "
                  "stored, new K/V and q; \"-\": no compute-cache timing to compare with).", "",
                  format_markdown(formats, ("model", "dtype", "batch")).rstrip("\n")]
    return "\n".join(lines) + "\n"
