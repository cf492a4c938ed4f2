"""``tuner bench``: per-scale and total latency, images/s and KV bytes of one model + policy."""
from __future__ import annotations

import json
import platform
from typing import Optional

import typer

from tuner.cli import model_opts as mo
from tuner.cli.common import torch_dtype, user_errors
from tuner.errors import UserError
from tuner.options import BACKENDS, DTYPE_NAMES, SAMPLING, check_choice, resolve_backend, resolve_device
from tuner.paths import check_writable_file, ensure_parent


def register(app: typer.Typer) -> None:
    app.command("bench", help="Benchmark generation latency, throughput and KV-cache bytes.")(bench)


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
    """Time ``repeats`` generations of ``batch`` images after ``warmup`` runs; returns a plain dict."""
    import statistics

    import torch

    from tuner.memory import memory_report
    from tuner.model.generate import generate

    n_cls = loaded.config.var.num_classes
    labels = torch.arange(batch, device=device) % n_cls
    cuda = str(device).startswith("cuda")
    if cuda:  # peak memory of the timed runs alone (weights included, earlier runs' peaks not)
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for i in range(warmup + repeats):
        res = generate(loaded.var, loaded.vae, labels, seed=seed + i, policy=policy, spec=spec,
                       backend=backend, dtype=dtype, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
                       cfg=SAMPLING.cfg)
        if i >= warmup:
            runs.append(res.scale_seconds)
    per_scale = [statistics.median(r[s] for r in runs) for s in range(len(runs[0]))]
    total = sum(per_scale)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    report = memory_report(policy, loaded.config, dtype=dtype_name, cfg=True, batch=batch, spec=spec)
    return {
        "model": loaded.config.name, "weights": loaded.source, "policy": policy.family,
        "batch": batch, "device": device, "dtype": dtype_name, "backend": backend,
        "machine": machine_description(device), "repeats": repeats,
        "per_scale_ms": [round(1e3 * t, 3) for t in per_scale],
        "total_ms": round(1e3 * total, 3), "images_per_s": round(batch / total, 3),
        "kv_bytes_allocated": res.kv_bytes_allocated,
        "kv_bytes_planned": report.kv_bytes_per_image * batch,
        "kv_bytes_per_image": report.kv_bytes_per_image,
        "memory_fraction": report.fraction,
        "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
    }


def format_table(r: dict) -> str:
    lines = [f"model {r['model']} ({r['weights']}), policy {r['policy']}, batch {r['batch']}, {r['dtype']}, "
             f"backend {r['backend']}, {r['machine']}", "",
             "| scale | latency (ms) |", "|---|---|"]
    lines += [f"| {i} | {ms:.2f} |" for i, ms in enumerate(r["per_scale_ms"])]
    lines += ["", f"total {r['total_ms']:.1f} ms, {r['images_per_s']:.2f} images/s, "
              f"KV cache {r['kv_bytes_allocated']:,} B allocated (planned {r['kv_bytes_planned']:,} B; "
              f"{r['kv_bytes_per_image']:,} B per image, {100 * r['memory_fraction']:.1f}% of full)"]
    if r.get("peak_bytes") is not None:
        lines.append(f"peak GPU memory {r['peak_bytes']:,} B (torch.cuda.max_memory_allocated)")
    return "\n".join(lines)


@user_errors
def bench(
    model: str = mo.ModelOpt,
    var_ckpt: Optional[str] = mo.VarCkptOpt,
    vae_ckpt: Optional[str] = mo.VaeCkptOpt,
    weights_dir: Optional[str] = mo.WeightsDirOpt,
    random_weights: bool = mo.RandomWeightsOpt,
    policy: Optional[str] = mo.PolicyOpt,
    batch: int = typer.Option(8, "--batch", help="Images per forward pass."),
    device: str = mo.DeviceOpt,
    dtype: str = mo.DtypeOpt,
    attention_backend: str = mo.BackendOpt,
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs (median per scale is reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    out: Optional[str] = typer.Option(None, "--out", help="Also append the table (markdown) to this file."),
) -> None:
    if batch <= 0 or repeats <= 0 or warmup < 0:
        raise UserError("--batch and --repeats must be positive and --warmup >= 0")
    check_choice(dtype, DTYPE_NAMES, "--dtype")
    check_choice(attention_backend, BACKENDS, "--attention-backend")
    if out is not None:
        check_writable_file(out, "--out")  # before the benchmark, not after it
    tdtype = torch_dtype(dtype)
    dev = resolve_device(device)
    loaded = mo.load_model_from_options(model, var_ckpt, vae_ckpt, weights_dir, random_weights, dev)
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
