"""CPU threads: the per-worker rule of the search (tuner/threads.py), ``apply_threads`` and RayPool's
``threads`` override. The rule's measurement is experiments/search/threads.md (no timing here)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from tuner.errors import UserError
from tuner.threads import apply_threads, check_threads, worker_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus,workers,expected", [
    (1, 1, 1),    # one core: nothing to leave to the driver, the worker still gets a thread
    (2, 1, 1),    # the project's box: one core for the worker, one for the driver
    (2, 2, 1),    # more workers than cores left: at least 1 each
    (4, 1, 3),
    (4, 3, 1),
    (8, 4, 1),
    (16, 3, 5),
    (16, 8, 1),
    (32, 8, 3),
])
def test_workers_together_leave_one_core_to_the_driver(cpus, workers, expected):
    threads = worker_threads(cpus, workers)
    assert threads == expected
    assert workers * threads <= max(cpus - 1, 1) or threads == 1


def test_worker_threads_reserve_is_a_parameter():
    assert worker_threads(2, 1, driver_reserve=0) == 2
    assert worker_threads(8, 2, driver_reserve=2) == 3
    assert worker_threads(2, 1, driver_reserve=2) == 2  # nothing left after the reserve: it is not taken


@pytest.mark.parametrize("args", [(0, 1), (2, 0), (2, 1, -1)])
def test_worker_threads_refuses_nonsense(args):
    with pytest.raises(ValueError):
        worker_threads(*args)


def test_check_threads_message():
    check_threads(None)
    check_threads(1)
    with pytest.raises(UserError, match=r"^--threads 0 must be at least 1$"):
        check_threads(0)
    with pytest.raises(UserError, match=r"^--threads -3 must be at least 1$"):
        check_threads(-3)


def test_apply_threads_sets_torch_and_none_keeps_the_default(restore_threads):
    before = torch.get_num_threads()
    apply_threads(None)
    assert torch.get_num_threads() == before
    apply_threads(1)
    assert torch.get_num_threads() == 1
    with pytest.raises(UserError):
        apply_threads(0)
    assert torch.get_num_threads() == 1


# --- RayPool: the rule by default, the constructor's threads when given ------------------------------------
def _fake_ray(cpus: float, created: list) -> types.ModuleType:
    """Just enough of ``ray`` for RayPool.start/close on an already connected CPU-only cluster."""

    class _Actor:
        def options(self, **options):
            return types.SimpleNamespace(remote=lambda *args: _ready(options, args))

    def _ready(options, args):
        created.append((options, args))
        return types.SimpleNamespace(ready=types.SimpleNamespace(
            remote=lambda: {"pid": len(created), "model_hash": "h"}))

    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    fake.cluster_resources = lambda: {"CPU": cpus}
    fake.remote = lambda cls: _Actor()
    fake.get = lambda refs, timeout=None: list(refs)
    fake.kill = lambda actor, no_restart=True: None
    return fake


@pytest.mark.parametrize("cpus,workers,threads,expected", [
    (2.0, 1, None, 1),   # was cpus // workers = 2: the worker fought the driver for both cores
    (8.0, 2, None, 3),
    (8.0, 2, 4, 4),      # --threads overrides the rule
    (2.0, 2, 1, 1),
])
def test_ray_pool_cpu_actors_get_the_rule_or_the_override(monkeypatch, cpus, workers, threads, expected):
    from tuner.search.ray_pool import RayPool

    created: list = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(cpus, created))
    pool = RayPool("tests.nothing:factory", {"model": "tiny"}, workers=workers, address="auto",
                   trial_timeout_s=60, threads=threads)
    pool.start()
    pool.close()
    assert len(created) == workers
    assert {args[2] for _options, args in created} == {expected}
    assert all(args[1]["device"] == "cpu" for _options, args in created)


def test_ray_pool_refuses_zero_threads():
    from tuner.search.ray_pool import RayPool

    with pytest.raises(UserError, match="--threads 0 must be at least 1"):
        RayPool("tests.nothing:factory", {}, workers=1, address="auto", trial_timeout_s=60, threads=0)
