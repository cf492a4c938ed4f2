"""How many torch threads a CPU search worker should use: tiny generation throughput per (workers,
threads) while the machine is idle and while a busy process imitates the search driver.

    python -m experiments.threads_bench                        # -> experiments/search/threads.md
    python -m experiments.threads_bench --images 12 --rounds 1 --quiet 1 --out /tmp/threads.md   # quick look

Each worker is its own process (as a Ray CPU actor is) holding the built-in tiny model; it sets
``torch.set_num_threads(threads)``, warms up, waits for the others, then generates ``--images`` images
in batches of ``--batches`` (seed ``i`` for batch ``i``; default sampling; it stops early after the
batch that passes ``--max-seconds``). Throughput is the sum of the workers' images/s. The *driver*
load runs in one more process for the whole
measurement: ``tpe`` loops Optuna TPE ``ask``/``tell`` on an in-memory study (what ``tuner search``'s
driver does between trials, here without pause: the worst case); ``duty`` does the same for
``--duty-busy`` seconds, then sleeps ``--duty-idle`` seconds (one ~0.2 s ask per ~1 s trial: a driver
that only asks); ``spin`` is a bare Python loop.

Each measurement also records the CPU that processes not this benchmark's used meanwhile
(``/proc/stat`` minus ours): on a shared machine, configurations are measured in interleaved rounds
until each has ``--quiet`` measurements with others under 0.2 cores (at most ``--rounds`` rounds), and
the table shows the median of those next to every measurement; the ratio is to 1 worker x 1 thread on
the same load. ``--wait-quiet`` waits a little for a quiet moment before each measurement.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- processes
def _worker(conn) -> None:
    """Worker process: load tiny once, then serve ``(threads, batch, images, warmup)`` requests.

    Protocol per request: receive the request, warm up, send ``"ready"``, receive ``"go"``, generate
    ``images`` images or stop after the batch that passes ``max_s`` seconds (a collapsed configuration
    would otherwise take minutes), send ``(images done, seconds)``. ``None`` ends the process.
    """
    import torch

    from tuner.model.generate import generate
    from tuner.model.loading import load_model

    loaded = load_model("tiny")
    n_cls = loaded.config.var.num_classes
    while True:
        req = conn.recv()
        if req is None:
            return
        threads, batch, images, warmup, max_s = req
        torch.set_num_threads(threads)
        labels = torch.arange(batch) % n_cls
        for i in range(warmup):
            generate(loaded.var, loaded.vae, labels, seed=10_000 + i)
        conn.send("ready")
        conn.recv()  # "go"
        t0 = time.perf_counter()
        done = 0
        for i in range(-(-images // batch)):
            generate(loaded.var, loaded.vae, labels, seed=i)
            done += batch
            if time.perf_counter() - t0 > max_s:
                break
        conn.send((done, time.perf_counter() - t0))


def _driver_load(kind: str, stop, busy_s: float, idle_s: float) -> None:
    """Process imitating the search driver until ``stop`` is set (``tpe``, ``duty`` or ``spin``).

    ``duty``: ``busy_s`` seconds of TPE ask/tell, then ``idle_s`` seconds asleep, repeated.
    """
    if kind == "spin":
        while not stop.is_set():
            for _ in range(100_000):
                pass
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, told = None, 0
    busy_until = time.monotonic() + busy_s
    while not stop.is_set():
        if study is None or told >= 200:  # a fresh study every 200 trials: asks cost what a young search's do
            sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=10)
            study, told = optuna.create_study(sampler=sampler), 0
        trial = study.ask()
        value = sum(trial.suggest_float(f"x{j}", 0.0, 1.0) for j in range(8))
        value += trial.suggest_int("cap", 1, 680) / 680
        study.tell(trial, value)
        told += 1
        if kind == "duty" and time.monotonic() >= busy_until:
            stop.wait(idle_s)
            busy_until = time.monotonic() + busy_s


def _busy_ticks() -> int | None:
    """Busy clock ticks of the whole machine so far (``/proc/stat``; None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _process_ticks(pids) -> int:
    """utime + stime ticks of ``pids`` (processes that ended count 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total


def wait_quiet(ours, limit_s: float, below: float = 0.1) -> float:
    """Wait up to ``limit_s`` for a 1 s window in which processes not ours use < ``below`` cores (a
    shared machine: another engineer's job); returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        busy0, ours0, w0 = _busy_ticks(), _process_ticks(ours), time.monotonic()
        if busy0 is None:
            break
        time.sleep(1.0)
        others = ((_busy_ticks() - busy0) - (_process_ticks(ours) - ours0)) / os.sysconf("SC_CLK_TCK")
        if others / (time.monotonic() - w0) < below:
            break
    return time.monotonic() - t0


def measure(conns, workers: int, threads: int, batch: int, images: int, warmup: int, max_s: float,
            ours) -> tuple[float, float | None]:
    """``(aggregate images/s, cores used by processes not ours)`` of ``workers`` workers generating
    concurrently: the sum of the workers' rates (each its images over its own time; the workers start
    together); ``ours``: pids of this benchmark's processes."""
    used = conns[:workers]
    for c in used:
        c.send((threads, batch, images, warmup, max_s))
    for c in used:
        assert c.recv() == "ready"
    busy0, ours0, t0 = _busy_ticks(), _process_ticks(ours), time.monotonic()
    for c in used:
        c.send("go")
    done = [c.recv() for c in used]
    busy1, ours1, wall = _busy_ticks(), _process_ticks(ours), time.monotonic() - t0
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / os.sysconf("SC_CLK_TCK") / wall
    return sum(n / seconds for n, seconds in done), others


# -------------------------------------------------------------------------------------------------- main
QUIET_CORES = 0.2  # a measurement counts as quiet when processes not ours used less than this ...
BUSY_CORES = 0.8  # ... and as "others busy" from this on (about one core of someone else's job)


def report(rows: list[dict], args, header: str) -> str:
    """The markdown table: per configuration the median of its quiet measurements, the median of those
    with another core's worth of other work running (a shared machine's usual state), and every one."""
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    loads, batches = args.loads.split(","), ints(args.batches)
    worker_list, thread_list = ints(args.workers), ints(args.threads)

    def median(key, keep):
        rates = [r["images_per_s"] for r in rows
                 if (r["load"], r["batch"], r["workers"], r["threads"]) == key and keep(r["others_cores"])]
        return statistics.median(rates) if rates else None

    def cells(value, base):
        if value is None:
            return "- | -"
        return f"{value:.2f} | " + (f"{value / base:.2f}" if base else "-")

    quiet = lambda c: c < QUIET_CORES  # noqa: E731
    busy = lambda c: c >= BUSY_CORES  # noqa: E731
    lines = [header,
             "| load | batch | workers | threads/worker | workers × threads | images/s, quiet | × | "
             "images/s, others busy | × | every measurement: images/s (others' cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for load, batch in itertools.product(loads, batches):
        base_q, base_b = median((load, batch, 1, 1), quiet), median((load, batch, 1, 1), busy)
        for workers, threads in itertools.product(worker_list, thread_list):
            key = (load, batch, workers, threads)
            every = ", ".join(f"{r['images_per_s']:.1f} ({r['others_cores']:.2f})" for r in rows
                              if (r["load"], r["batch"], r["workers"], r["threads"]) == key)
            lines.append(f"| {load} | {batch} | {workers} | {threads} | {workers * threads} | "
                         f"{cells(median(key, quiet), base_q)} | {cells(median(key, busy), base_b)} | "
                         f"{every} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=30, help="timed images per worker and configuration")
    ap.add_argument("--max-seconds", type=float, default=10.0,
                    help="a worker stops after the batch that passes this many seconds (fewer images)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first (after setting threads)")
    ap.add_argument("--batches", default="1,8", help="images per forward pass")
    ap.add_argument("--threads", default="1,2", help="torch threads per worker")
    ap.add_argument("--workers", default="1,2", help="concurrent worker processes")
    ap.add_argument("--loads", default="idle,duty,tpe", help="idle, duty, tpe or spin (see above)")
    ap.add_argument("--duty-busy", type=float, default=0.2, help="duty load: seconds of ask/tell ...")
    ap.add_argument("--duty-idle", type=float, default=0.8, help="... then seconds asleep")
    ap.add_argument("--quiet", type=int, default=2,
                    help=f"quiet measurements wanted per configuration (others < {QUIET_CORES} cores)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="at most this many rounds over the grid; a round measures only the "
                         "configurations still short of --quiet quiet measurements")
    ap.add_argument("--wait-quiet", type=float, default=3.0,
                    help="before each measurement, wait up to this many seconds for the machine's other "
                         "processes to go quiet (< 0.1 cores for 1 s)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "search" / "threads.md"),
                    help="the table; every measurement goes to the .csv beside it")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    batches, thread_list, worker_list = ints(args.batches), ints(args.threads), ints(args.workers)
    loads = args.loads.split(",")
    t_start = time.monotonic()

    ctx = mp.get_context("spawn")  # fresh interpreters, as Ray starts its workers
    pipes = [ctx.Pipe() for _ in range(max(worker_list))]
    procs = [ctx.Process(target=_worker, args=(child,), daemon=True) for _, child in pipes]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    rows: list[dict] = []
    quiet: dict[tuple, int] = {}
    try:
        for rnd in range(args.rounds):
            for load in loads:
                todo = [(b, w, t) for b, w, t in itertools.product(batches, worker_list, thread_list)
                        if quiet.get((load, b, w, t), 0) < args.quiet]
                if not todo:
                    continue
                stop = ctx.Event()
                hog = None if load == "idle" else ctx.Process(
                    target=_driver_load, args=(load, stop, args.duty_busy, args.duty_idle), daemon=True)
                if hog is not None:
                    hog.start()
                    time.sleep(1.0)  # past its imports: the load is on when timing starts
                ours = [os.getpid(), *(p.pid for p in procs), *([hog.pid] if hog is not None else [])]
                for batch, workers, threads in todo:
                    key = (load, batch, workers, threads)
                    wait_quiet(ours, args.wait_quiet)
                    rate, others = measure(conns, workers, threads, batch, args.images, args.warmup,
                                           args.max_seconds, ours)
                    others = float("nan") if others is None else others
                    quiet[key] = quiet.get(key, 0) + (others < QUIET_CORES)
                    rows.append(dict(round=rnd, load=load, batch=batch, workers=workers, threads=threads,
                                     images_per_s=round(rate, 3), others_cores=round(others, 3)))
                    print(f"round {rnd} load {load:<4} batch {batch} workers {workers} threads {threads}: "
                          f"{rate:.2f} images/s, others' CPU {others:.2f} cores", flush=True)
                if hog is not None:
                    stop.set()
                    hog.join(10)
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(10)

    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cmd = "python -m experiments.threads_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    short = sorted(k for k in itertools.product(loads, batches, worker_list, thread_list)
                   if quiet.get(k, 0) < args.quiet)
    header = "\n".join([
        "# Torch threads per CPU search worker, idle and with a busy driver", "",
        f"Command: `{cmd.strip()}`; machine: {platform.machine()} CPU, {os.cpu_count()} cores "
        f"(`os.cpu_count()`), torch {torch.__version__}, python {platform.python_version()}; date "
        f"{dt.date.today().isoformat()}; wall time {time.monotonic() - t_start:.0f} s; every measurement in "
        f"`{out.with_suffix('.csv').name}`.", "",
        f"Built-in tiny model, full cache, default sampling; each worker a separate process generating "
        f"{args.images} images per measurement (fewer when a batch ends past {args.max_seconds:g} s) "
        f"after {args.warmup} warm-up batch(es), all workers starting together. Throughput = the sum "
        f"of the workers' images/s. Load `tpe`: one more process looping Optuna TPE ask/tell without "
        f"pause (the search driver at its busiest); `duty`: the same for {args.duty_busy:g} s, then "
        f"{args.duty_idle:g} s asleep (one ask per ~1 s trial); `spin`: a bare Python loop; `idle`: "
        f"nothing else of ours running.", "",
        f"The machine is shared, so every measurement records the cores that processes not this "
        f"benchmark's used meanwhile (/proc/stat busy time minus ours). *Quiet*: under {QUIET_CORES:g} "
        f"cores; *others busy*: {BUSY_CORES:g} cores or more (another job on about one core). Each "
        f"images/s column is the median of a configuration's measurements in that state (up to "
        f"{args.rounds} interleaved rounds until each has {args.quiet} quiet ones; each measurement "
        f"first waited up to {args.wait_quiet:g} s for < 0.1 cores). × = ratio to 1 worker × 1 thread "
        f"under the same load, batch and state. "
        + (f"Short of {args.quiet} quiet measurements: {len(short)} configuration(s) (see the last column)."
           if short else f"Every configuration has {args.quiet} quiet measurements."), ""])
    old = out.read_text() if out.is_file() else ""
    marker = "<!-- hand-written conclusion below: kept when the table is regenerated -->"
    tail = old[old.index(marker):] if marker in old else marker + "\n"
    out.write_text(report(rows, args, header) + "\n\n" + tail)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
