"""``python -m experiments.gpu.e2e``: end-to-end speed, peak memory and max batch of the three policies.

What ``tuner bench --model d30 --random-weights --dtype bf16 --attention-backend triton [--policy FILE]``
does, in one process so the model is built once (d30's random weights take most of a minute), via
the same library calls (:func:`tuner.cli.bench_cmd.run_bench` on :func:`tuner.model.loading.load_model`),
plus what the command cannot report: the peak ``torch.cuda.max_memory_allocated`` of the run, and the
largest batch that fits next to ``tuner plan``'s :func:`tuner.memory.max_batch` for the same memory.

Writes ``OUT/e2e.json`` after every stage (a run killed at its time limit leaves what it measured)
and the policy files under ``OUT/policies/``. Mismatches (allocated KV bytes != planned, an OOM at
the planned batch, a probe that failed for another reason) are listed in the JSON's ``mismatches``;
the driver turns them into a non-zero exit. The exit status here is non-zero only when the worker
itself broke.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path


def parse_args(argv):
    from experiments.gpu.policies import DEFAULT_JOINT_FILE

    p = argparse.ArgumentParser(prog="python -m experiments.gpu.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="d30", help="named model with random weights, or toy (dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--backend", default="triton", choices=("torch", "triton"))
    p.add_argument("--batch", type=int, default=64, help="the equal batch of the images/s comparison")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-target", default="15%")
    p.add_argument("--preset", default="ams",
                   help="paper preset fitted to --mem-target (tuner presets names)")
    p.add_argument("--joint-file", type=Path, default=DEFAULT_JOINT_FILE)
    p.add_argument("--calibration-samples", type=int, default=2)
    p.add_argument("--maxbatch-mem", default="24GiB",
                   help="device memory of the max-batch search: a size (the allocator is capped to it) or "
                        "'device' (all of it); on CPU the fake budget of the allocation probe")
    p.add_argument("--max-probes", type=int, default=8, help="per policy")
    p.add_argument("--probe-limit-s", type=float, default=40.0,
                   help="no probe predicted to take longer starts")
    p.add_argument("--resolution", type=float, default=0.05, help="stop bisecting within this fraction")
    p.add_argument("--deadline-s", type=float, default=300.0, help="start no new stage/probe after this")
    p.add_argument("--plan-offset", type=int, default=0,
                   help="TEST ONLY: add this many bytes to every planned KV-per-image figure (a planned/"
                        "allocated mismatch the tests inject to prove the check fails)")
    return p.parse_args(argv)


class Recorder:
    """The JSON result, rewritten whole after every stage."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def mismatch(self, text: str) -> None:
        print(f"MISMATCH: {text}", flush=True)
        self.data["mismatches"].append(text)
        self.save()


def planned(candidate, cfg, *, dtype: str, batch: int, offset: int):
    """``tuner plan``'s memory report of a candidate (``offset``: the test-only perturbation)."""
    from tuner.memory import memory_report

    report = memory_report(candidate.policy, cfg, dtype=dtype, cfg=True, batch=batch, spec=candidate.spec)
    return (dataclasses.replace(report, kv_bytes_per_image=report.kv_bytes_per_image + offset) if offset
            else report)


def bench_one(loaded, c, args, dtype, rec: Recorder, entry: dict) -> None:
    """Images/s at the equal batch and, on CUDA, the peak allocated memory next to the plan."""
    import torch

    from tuner.cli.bench_cmd import run_bench
    from tuner.memory import max_batch

    cuda = args.device.startswith("cuda")
    report = planned(c, loaded.config, dtype=args.dtype, batch=args.batch, offset=args.plan_offset)
    est = max_batch(report, loaded.config, 1 << 40, args.dtype, backend=args.backend)
    if cuda:
        torch.cuda.synchronize()
        resident = int(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    r = run_bench(loaded, c.policy, c.spec, batch=args.batch, device=args.device, dtype=dtype,
                  backend=args.backend, warmup=args.warmup, repeats=args.repeats)
    r["kv_bytes_planned"] = report.kv_bytes_per_image * args.batch  # incl. the test-only offset
    r["resident_bytes_before"] = resident if cuda else None
    r["peak_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
    r["planned_run_bytes"] = args.batch * (est.kv_bytes_per_image + est.activation_bytes_per_image)
    r["planned_peak_bytes"] = est.weights_bytes + r["planned_run_bytes"]
    entry["bench"] = r
    peak = "n/a (CPU)" if r["peak_bytes"] is None else f"{r['peak_bytes']:,} B"
    print(f"  {c.name}: {r['images_per_s']} images/s end to end ({r['transformer_images_per_s']} transformer "
          f"only), KV {r['kv_bytes_allocated']:,} B allocated vs "
          f"{r['kv_bytes_planned']:,} B planned, peak {peak}", flush=True)
    if r["kv_bytes_allocated"] != r["kv_bytes_planned"]:
        rec.mismatch(f"{c.name}: KV bytes allocated {r['kv_bytes_allocated']:,} != planned "
                     f"{r['kv_bytes_planned']:,} at batch {args.batch}")
    rec.save()


def maxbatch_one(loaded, c, args, dtype, mem_bytes: int, deadline: float, rec: Recorder, entry: dict) -> None:
    """The largest batch of one candidate next to the planner's, within the deadline."""
    from experiments.gpu.maxbatch import allocation_probe, cuda_probe, search_max_batch
    from tuner.cli.bench_cmd import run_bench
    from tuner.memory import max_batch

    cfg = loaded.config
    report = planned(c, cfg, dtype=args.dtype, batch=1, offset=args.plan_offset)
    est = max_batch(report, cfg, mem_bytes, args.dtype, backend=args.backend)
    if args.device.startswith("cuda"):
        probe = cuda_probe(lambda b: run_bench(loaded, c.policy, c.spec, batch=b, device=args.device,
                                               dtype=dtype, backend=args.backend, warmup=0, repeats=1))
    else:
        true_report = planned(c, cfg, dtype=args.dtype, batch=1, offset=0)
        true_est = max_batch(true_report, cfg, mem_bytes, args.dtype, backend=args.backend)
        probe = allocation_probe(plan=true_report.plan, geometry=true_report.geometry, dtype=dtype,
                                 policy=c.policy, backend=args.backend,
                                 fixed_bytes=true_est.weights_bytes + true_est.reserve_bytes,
                                 activation_bytes_per_image=true_est.activation_bytes_per_image,
                                 device_mem_bytes=mem_bytes)
    print(f"  {c.name}: tuner plan predicts max batch {est.batch} on {mem_bytes / 2**30:.2f} GiB", flush=True)
    entry["maxbatch"] = {"planned": est.batch, "device_mem_bytes": mem_bytes,
                         "estimate": dataclasses.asdict(est),
                         "search": {"measured": 0, "upper": None, "complete": False, "stop_reason": "running",
                                    "probes": []}}

    def on_probe(p) -> None:  # the probes so far, saved as they end (a killed worker keeps them)
        entry["maxbatch"]["search"]["probes"].append(dataclasses.asdict(p))
        rec.save()

    # One timed generation of the benchmark bounds the first probe too: its scale loop's time per image,
    # plus half again for the VAE decoding and the first-call overheads the benchmark's median leaves out
    # (the same bound as before the benchmark timed the decode; end_to_end_ms would need its own margin).
    # (On the CPU the probe only allocates: the benchmark's time says nothing about it.)
    bench = entry.get("bench") if args.device.startswith("cuda") else None
    reference = (bench["batch"], 1.5 * bench["transformer_ms"] / 1e3) if bench else None
    res = search_max_batch(probe, est.batch, max_probes=args.max_probes, resolution=args.resolution,
                           probe_limit_s=args.probe_limit_s, time_left=lambda: deadline - time.monotonic(),
                           reference=reference, on_probe=on_probe)
    entry["maxbatch"]["search"] = res.as_dict()
    if res.measured == 0:
        rec.mismatch(f"{c.name}: no max batch measured ({res.stop_reason})")
    first = res.probes[0] if res.probes else None
    if (first is not None and first.batch == est.batch and est.batch > 0 and not first.fits
            and not first.error):
        rec.mismatch(f"{c.name}: out of memory at the planned max batch {est.batch}")
    for p in res.probes:
        if p.error:
            rec.mismatch(f"{c.name}: probe at batch {p.batch} failed ({p.error})")
        if p.kv_bytes is not None and p.kv_bytes != report.kv_bytes_per_image * p.batch:
            rec.mismatch(f"{c.name}: KV bytes allocated {p.kv_bytes:,} != planned "
                         f"{report.kv_bytes_per_image * p.batch:,} at batch {p.batch}")
            break
    rec.save()


def device_memory(args) -> tuple[int, str]:
    """Bytes the max-batch search may use, capping the CUDA allocator to them (``--maxbatch-mem``)."""
    from tuner.mem_target import parse_size

    if not args.device.startswith("cuda"):
        return parse_size(args.maxbatch_mem), "fake budget of the allocation probe (CPU dry run)"
    import torch

    total = int(torch.cuda.get_device_properties(torch.device(args.device)).total_memory)
    if args.maxbatch_mem == "device":
        return total, "all device memory"
    cap = parse_size(args.maxbatch_mem)
    if cap > total:
        raise ValueError(f"--maxbatch-mem {args.maxbatch_mem} exceeds the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total, torch.device(args.device))
    return cap, f"allocator capped to {args.maxbatch_mem} of {total / 2**30:.1f} GiB"


def main(argv=None) -> int:
    from experiments.gpu.env import machine_info
    from experiments.gpu.policies import calibrate, load, make_candidates

    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    deadline = t_start + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out / "e2e.json", {"args": vars(args), "machine": machine_info(), "stages": {},
                                           "policies": [], "mismatches": [], "error": None})
    try:
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        t0 = time.monotonic()
        loaded = load(args.model, args.device)
        cal = calibrate(loaded, args.calibration_samples)
        cands = make_candidates(loaded, mem_target=args.mem_target, preset=args.preset,
                                joint_file=args.joint_file,
                                calibration=cal, out=args.out / "policies", dtype=args.dtype)
        rec.data["stages"]["load_s"] = round(time.monotonic() - t0, 2)
        entries = []
        for c in cands:
            report = planned(c, loaded.config, dtype=args.dtype, batch=1, offset=0)
            entries.append({"name": c.name, "note": c.note, "file": c.file, "family": c.policy.family,
                            "params": c.policy.params(), "fraction": report.fraction,
                            "kv_bytes_per_image": report.kv_bytes_per_image})
        rec.data["policies"] = entries
        rec.save()
        t0 = time.monotonic()
        for c, entry in zip(cands, entries):
            bench_one(loaded, c, args, dtype, rec, entry)
        rec.data["stages"]["bench_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        mem, how = device_memory(args)
        rec.data["maxbatch_memory"] = {"bytes": mem, "how": how}
        for i, (c, entry) in enumerate(zip(cands, entries)):
            # An equal share of what is left for each remaining policy, so the last is not starved.
            share = (deadline - time.monotonic()) / (len(cands) - i)
            maxbatch_one(loaded, c, args, dtype, mem, time.monotonic() + share, rec, entry)
        rec.data["stages"]["maxbatch_s"] = round(time.monotonic() - t0, 2)
    except Exception as exc:  # noqa: BLE001 - recorded for the report, then a non-zero exit
        traceback.print_exc()
        rec.data["error"] = f"{type(exc).__name__}: {exc}"
        rec.save()
        return 1
    rec.data["stages"]["total_s"] = round(time.monotonic() - t_start, 2)
    rec.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
