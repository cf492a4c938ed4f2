"""``tuner bench``: per-scale, transformer, decode and end-to-end latency, images/s and KV bytes of one
model + policy."""
from __future__ import annotations

import json
import platform
from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import torch_dtype, user_errors
from tuner.errors import UserError
from tuner.options import BACKENDS, DTYPE_NAMES, check_choice, resolve_backend, resolve_device
from tuner.paths import check_writable_file, ensure_parent
from tuner.threads import apply_threads, check_threads


def register(app: typer.Typer) -> None:
    app.command("bench", help="Benchmark generation latency (per scale; transformer, VQ-VAE decode and end "
                              "to end per batch), images/s and KV-cache bytes.")(bench)


def machine_description(device: str) -> str:
    """One line naming the processor or GPU, core count and library versions."""
    import os

    import torch

    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        hw = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} threads")
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"


def run_bench(loaded, policy, spec, *, batch: int, device: str, dtype, backend: str, warmup: int,
              repeats: int, seed: int = 0) -> dict:
    """Time ``repeats`` generations of ``batch`` images after ``warmup`` runs; returns a plain dict.

    Three times per batch, each the median over the timed runs (seconds in the code, ms in the dict):
    ``transformer_ms`` the scale loop (:attr:`GenerationResult.scale_seconds` summed), ``decode_ms`` the
    VQ-VAE decode (``decode_seconds``), ``end_to_end_ms`` the whole :func:`generate` call (cache
    allocation, scale loop, decode; images left on the device), synchronised on CUDA before each clock
    read. Each run's end to end contains its loop, so ``end_to_end_ms >= transformer_ms`` (medians
    keep that order). ``images_per_s`` is end to end, ``transformer_images_per_s`` the loop alone.
    ``per_scale_ms``: median per scale (their sum can differ slightly from ``transformer_ms``, the
    median of the per-run sums).
    """
    import statistics
    import time

    import torch

    from tuner.memory import memory_report

    conditions = torch.arange(batch) % loaded.num_conditions  # classes, or prompts (Infinity)
    cuda = str(device).startswith("cuda")
    if cuda:  # peak memory of the timed runs alone (weights included, earlier runs' peaks not)
        torch.cuda.reset_peak_memory_stats(device)
    runs, decode, end_to_end = [], [], []
    for i in range(warmup + repeats):
        if cuda:  # as generate() times its scales: nothing earlier still queued when the clock starts
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = loaded.generate_chunk(conditions, seed=seed + i, policy=policy, spec=spec, backend=backend,
                                    dtype=dtype, **loaded.config.sampling.as_kwargs())
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            runs.append(res.scale_seconds)
            decode.append(res.decode_seconds)
            end_to_end.append(elapsed)
    per_scale = [statistics.median(r[s] for r in runs) for s in range(len(runs[0]))]
    transformer = statistics.median(sum(r) for r in runs)
    decode_s, total = statistics.median(decode), statistics.median(end_to_end)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    report = memory_report(policy, loaded.config, dtype=dtype_name, cfg=True, batch=batch, spec=spec)
    return {
        "model": loaded.config.name, "weights": loaded.source, "policy": policy.family,
        "batch": batch, "device": device, "dtype": dtype_name, "backend": backend,
        "machine": machine_description(device), "repeats": repeats,
        "per_scale_ms": [round(1e3 * t, 3) for t in per_scale],
        "transformer_ms": round(1e3 * transformer, 3), "decode_ms": round(1e3 * decode_s, 3),
        "end_to_end_ms": round(1e3 * total, 3),
        "images_per_s": round(batch / total, 3), "transformer_images_per_s": round(batch / transformer, 3),
        "kv_bytes_allocated": res.kv_bytes_allocated,
        "kv_bytes_planned": report.kv_bytes_per_image * batch,
        "kv_bytes_per_image": report.kv_bytes_per_image,
        "memory_fraction": report.fraction,
        "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "note": loaded.note,
    }


def format_table(r: dict) -> str:
    lines = [f"model {r['model']} ({r['weights']}), policy {r['policy']}, batch {r['batch']}, {r['dtype']}, "
             f"backend {r['backend']}, {r['machine']}", "",
             "| scale | latency (ms) |", "|---|---|"]
    lines += [f"| {i} | {ms:.2f} |" for i, ms in enumerate(r["per_scale_ms"])]
    runs = f"{r['repeats']} run" + ("s" if r["repeats"] != 1 else "")
    lines += ["", f"per batch of {r['batch']} (median of {runs}): transformer (scale loop) "
              f"{r['transformer_ms']:.1f} ms, VQ-VAE decode {r['decode_ms']:.1f} ms, end to end "
              f"{r['end_to_end_ms']:.1f} ms",
              f"{r['images_per_s']:.2f} images/s end to end (transformer only: "
              f"{r['transformer_images_per_s']:.2f} images/s)",
              f"KV cache {r['kv_bytes_allocated']:,} B allocated (planned {r['kv_bytes_planned']:,} B; "
              f"{r['kv_bytes_per_image']:,} B per image, {100 * r['memory_fraction']:.1f}% of full)"]
    if r.get("peak_bytes") is not None:
        lines.append(f"peak GPU memory {r['peak_bytes']:,} B (torch.cuda.max_memory_allocated)")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


@user_errors
def bench(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    sides: Optional[str] = mo.SidesOpt,
    aspect: Optional[str] = mo.AspectOpt,
    scales: Optional[int] = mo.ScalesOpt,
    policy: Optional[str] = mo.PolicyOpt,
    batch: int = typer.Option(8, "--batch", help="Images per forward pass."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    attention_backend: str = mo.BackendOpt,
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs (medians are reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    out: Optional[str] = typer.Option(None, "--out", help="Also append the table (markdown) to this file."),
    threads: Optional[int] = mo.ThreadsOpt,
) -> None:
    check_threads(threads)
    mo.check_schedule_options(sides, aspect, scales)
    if batch <= 0 or repeats <= 0 or warmup < 0:
        raise UserError("--batch and --repeats must be positive and --warmup >= 0")
    check_choice(dtype, DTYPE_NAMES, "--dtype")
    check_choice(attention_backend, BACKENDS, "--attention-backend")
    if out is not None:
        check_writable_file(out, "--out")  # before the benchmark, not after it
    apply_threads(threads)
    tdtype = torch_dtype(dtype)
    dev = resolve_device(device)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights, dev,
                                        sides=sides, aspect=aspect, scales=scales)
    pol, spec = mo.load_policy_option(policy, loaded)
    backend = resolve_backend(attention_backend, dev)
    result = run_bench(loaded, pol, spec, batch=batch, device=dev, dtype=tdtype, backend=backend,
                       warmup=warmup, repeats=repeats)
    text = json.dumps(result, indent=2) if as_json else format_table(result)
    typer.echo(text)
    if out is not None:
        try:
            with open(ensure_parent(out, "--out"), "a") as f:
                f.write(format_table(result) + "\n\n")
        except OSError as exc:
            raise UserError(f"--out {out} cannot be written ({exc.strerror or exc}); "
                            f"pass a writable file") from None
