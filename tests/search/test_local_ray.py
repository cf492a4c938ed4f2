"""The local Ray cluster `tuner search` starts when no --ray-address is given (real Ray)."""
from __future__ import annotations

import os

import pytest

from tuner.search.ray_pool import start_ray

pytestmark = pytest.mark.ray


def test_local_workers_run_at_the_drivers_priority():
    """Ray's default would start workers at nice 15: a search's evaluations then starve behind any other
    job."""
    import ray

    assert start_ray(None), "Ray was already running in this process; this test needs a fresh local cluster"
    try:
        @ray.remote(num_cpus=0.5)
        class Probe:
            def niceness(self) -> tuple[int, int]:
                return os.getpid(), os.nice(0)

        pid, niceness = ray.get(Probe.remote().niceness.remote(), timeout=120)
        assert pid != os.getpid()
        assert niceness == os.nice(0)
    finally:
        ray.shutdown()
