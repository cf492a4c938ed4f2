"""The Ray evaluation pool: one actor per GPU (``num_gpus=1``), else N CPU actors.

Same interface as :class:`tuner.search.workers.InlinePool`. A request whose actor died, or that ran
past its deadline (hung actor, which is then killed), is retried once on a fresh actor; a second
failure comes back as a failed :class:`~tuner.search.workers.Outcome` and the search goes on.
Every ``ray.get`` has a timeout; ``num_gpus`` is only requested when the cluster has GPUs.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import UserError
from tuner.search.worker_host import WorkerHost
from tuner.search.workers import Outcome, default_cpu_workers
from tuner.threads import check_threads, worker_threads

# The local cluster's environment. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode:
# the node IP is 127.0.0.1, so GCS, raylet, agents, workers and the driver listen on loopback only
# (and no 8.8.8.8 probe). Ray reads it into ray_constants when `ray` is first imported, so
# :func:`local_ray_environment` also sets the constant of an already imported Ray.
# RAY_AUTH_MODE=disabled is safe only together with that: nothing off this machine can connect.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 # Ray starts workers at nice 15; here they do all of the search's work, so on a shared
                 # machine they would yield to every other job while the driver only waits for them.
                 "RAY_worker_niceness": "0"}
OBJECT_STORE_BYTES = 256 * 2**20  # workers exchange small dicts only
GPU_WAIT_S = 1800.0  # cloud GPU nodes take minutes to boot and set up
CPU_ACTOR_CPUS = 0.5  # fractional: two whole-CPU actors on 2 cores starve every other Ray task
READY_TIMEOUT_S = 900.0  # model load + calibration on a slow machine


@dataclass
class _Slot:
    actor: Any
    request: dict[str, Any] | None = None
    ref: Any = None
    deadline: float = 0.0
    attempts: int = 0
    restarts: int = 0
    pids: set = field(default_factory=set)


def _tcp_reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return True
    except OSError:
        return False


def check_ray_address(address: str | None) -> None:
    """Side-effect-free check of ``--ray-address``: None (local), ``auto``, ``host:port`` or
    ``ray://host:port`` with something listening there; else a one-line UserError."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--ray-address {address}: not a cluster address; give auto (on a cluster node), "
                        f"host:port of the head node (e.g. 10.0.0.5:6379) or ray://host:10001")
    if not _tcp_reachable(host, int(port)):
        raise UserError(f"--ray-address {address}: nothing listens there; start the cluster "
                        f"(ray start --head / ray up ray_cluster.yaml) or omit --ray-address for a local one")


def local_ray_environment() -> None:
    """Put the local cluster's environment in place, before ``ray`` is imported where possible.

    The loopback binding is forced (not ``setdefault``): a local cluster listening on every interface
    with authentication off would let anyone who reaches this machine run code as this user.
    """
    import sys

    for key, value in LOCAL_RAY_ENV.items():
        if key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported before us (e.g. by a library): its copy was read already
        constants.ENABLE_RAY_CLUSTER = False


def start_ray(address: str | None) -> bool:
    """Start a local Ray cluster (``address`` None) or join one; True when this call connected Ray.

    Local clusters get the loopback-only, no-telemetry, no-auth-token environment
    (:func:`local_ray_environment`) and a small object store; the dashboard is off. ``auto`` or
    ``host:port`` with no cluster there is a one-line UserError.
    """
    if address is None:
        local_ray_environment()
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        from tuner.search.ray_reaper import start_reaper

        tmp = os.environ.get("TUNER_RAY_TMPDIR")
        start_reaper(tmp)  # ends what Ray would leave behind if this process is killed
        kwargs: dict[str, Any] = {}
        if tmp:
            kwargs["_temp_dir"] = tmp
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, **kwargs)
        return True
    check_ray_address(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise UserError(f"--ray-address {address}: no running Ray cluster found "
                        f"({str(exc).splitlines()[0]}); "
                        f"start one with `ray start --head` or `ray up ray_cluster.yaml`, "
                        f"or omit --ray-address for a local cluster") from None
    return True


def wait_for_gpus(wanted: int, timeout_s: float, poll_s: float = 5.0) -> int:
    """Ask the cluster's autoscaler for ``wanted`` one-GPU bundles and wait until that many GPUs exist.

    Why: the pool sizes itself from the GPUs present when it starts, and an autoscaling cluster
    (``ray_cluster.yaml`` with ``min_workers: 0``) has none until something asks for them. The
    request stays in force for the driver's lifetime, so the nodes are kept while the search runs.
    Returns the GPUs present; UserError when fewer arrive within ``timeout_s``.
    """
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * wanted)
    deadline = time.monotonic() + timeout_s
    while True:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have >= wanted:
            return have
        if time.monotonic() >= deadline:
            raise UserError(f"--gpus {wanted}: the cluster has {have} GPU(s) after {timeout_s:.0f} s; "
                            f"raise the GPU worker type's max_workers (ray_cluster.yaml) or your cloud "
                            f"quota, or ask for fewer")
        time.sleep(poll_s)


class RayPool:
    """One actor per GPU (``num_gpus=1``) when the cluster has GPUs, else ``workers`` CPU actors.

    ``threads``: torch threads per CPU actor; None: :func:`tuner.threads.worker_threads` of the
    cluster's CPUs and the actor count (one core left to the driver). GPU actors keep torch's default.
    """

    kind = "ray"

    def __init__(self, factory: str, factory_kwargs: dict[str, Any], workers: int | None,
                 address: str | None, trial_timeout_s: float, device: str = "auto", gpus: int | None = None,
                 gpu_wait_s: float = GPU_WAIT_S, threads: int | None = None):
        self.factory, self.factory_kwargs = factory, dict(factory_kwargs)
        self.requested_workers, self.address = workers, address
        self.trial_timeout_s = trial_timeout_s
        self.device = device
        self.slots: list[_Slot] = []
        self.pending: list[tuple[dict[str, Any], int]] = []  # (request, attempts so far) waiting for an actor
        self.started_ray = False
        self.actor_cls: Any = None
        self.actor_options: dict[str, Any] = {}
        self.gpu = False
        self.total_restarts = 0
        self.gpus_wanted, self.gpu_wait_s = gpus, gpu_wait_s
        check_threads(threads)  # the one-line --threads error, also for a caller other than the CLI
        self.threads = threads

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        import ray

        self.started_ray = start_ray(self.address)
        if self.gpus_wanted:
            wait_for_gpus(self.gpus_wanted, self.gpu_wait_s)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        self.gpu = gpus > 0
        if self.gpu:
            n = min(gpus, self.requested_workers or self.gpus_wanted or gpus)
            self.actor_options = {"num_gpus": 1, "num_cpus": CPU_ACTOR_CPUS}
            threads = None
        else:
            n = self.requested_workers or default_cpu_workers()
            self.actor_options = {"num_cpus": CPU_ACTOR_CPUS}
            threads = self.threads if self.threads is not None else worker_threads(max(1, int(cpus)), n)
        kwargs = dict(self.factory_kwargs)
        if "device" not in kwargs and self.device not in (None, "", "auto"):
            kwargs["device"] = self.device
        elif "device" not in kwargs:
            kwargs["device"] = "cuda" if self.gpu else "cpu"
        self.actor_cls = ray.remote(WorkerHost)
        self._actor_args = (self.factory, kwargs, threads)
        self.slots = [_Slot(self._new_actor()) for _ in range(n)]
        refs = [s.actor.ready.remote() for s in self.slots]
        try:
            infos = ray.get(refs, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"the {n} Ray workers did not start within {READY_TIMEOUT_S:.0f} s; check the "
                            f"cluster has the resources ({self.actor_options})") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise UserError(f"a worker could not build the evaluator: "
                            f"{str(cause).splitlines()[-1]}") from None
        for slot, info in zip(self.slots, infos):
            slot.pids.add(info.get("pid"))
        hashes = {i["model_hash"] for i in infos}
        if len(hashes) != 1:
            raise UserError(f"workers loaded different checkpoints ({sorted(hashes)}); "
                            f"give every node the same weights")
        return infos[0]

    def _new_actor(self):
        return self.actor_cls.options(**self.actor_options).remote(*self._actor_args)

    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def idle(self) -> int:
        return sum(1 for s in self.slots if s.request is None) - len(self.pending)

    def submit(self, request: dict[str, Any]) -> None:
        self.pending.append((request, 0))
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.pending:
                return
            if slot.request is None:
                request, attempts = self.pending.pop(0)
                slot.request, slot.attempts = request, attempts + 1
                slot.ref = slot.actor.evaluate.remote(request)
                slot.deadline = time.monotonic() + self.trial_timeout_s

    def _replace_actor(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        slot.actor = self._new_actor()
        slot.restarts += 1
        self.total_restarts += 1

    def _fail_slot(self, slot: _Slot, reason: str, out: list[Outcome]) -> None:
        """The actor died or hung: replace it; retry the request once, then report it failed."""
        request, attempts = slot.request, slot.attempts
        slot.request, slot.ref = None, None
        self._replace_actor(slot)
        if attempts < 2:
            self.pending.insert(0, (request, attempts))
        else:
            out.append(Outcome(request, error=f"{reason} (after {attempts} attempts)", attempts=attempts))

    def poll(self, timeout: float) -> list[Outcome]:
        import ray

        out: list[Outcome] = []
        busy = {s.ref: s for s in self.slots if s.ref is not None}
        if busy:
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=timeout)
            for ref in ready:
                slot = busy[ref]
                try:
                    res = ray.get(ref, timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.WorkerCrashedError) as exc:
                    self._fail_slot(slot, f"worker died: {type(exc).__name__}", out)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    out.append(Outcome(slot.request, error=str(exc).splitlines()[-1], attempts=slot.attempts))
                else:
                    slot.pids.add(res.get("pid"))
                    out.append(Outcome(slot.request, result=res if "error" not in res else None,
                                       error=res.get("error"), attempts=slot.attempts))
                slot.request, slot.ref = None, None
        else:
            time.sleep(min(timeout, 0.05))
        now = time.monotonic()
        for slot in self.slots:
            if slot.ref is not None and now > slot.deadline:
                self._fail_slot(slot, f"no result within {self.trial_timeout_s:.0f} s (worker hung)", out)
        self._dispatch()
        return out

    def cancel_all(self) -> list[dict[str, Any]]:
        """Stop tracking every in-flight and pending request (their actors are killed by close)."""
        cancelled = [s.request for s in self.slots if s.request is not None] + [r for r, _ in self.pending]
        for slot in self.slots:
            slot.request, slot.ref = None, None
        self.pending = []
        return cancelled

    def status(self) -> str:
        busy = sum(1 for s in self.slots if s.request is not None)
        kind = "GPU" if self.gpu else "CPU"
        text = f"{len(self.slots)} Ray {kind} workers, {busy} busy"
        if self.pending:
            text += f", {len(self.pending)} queued"
        if self.total_restarts:
            text += f", {self.total_restarts} restarted"
        return text

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.slots = []
        if self.started_ray:
            ray.shutdown()
