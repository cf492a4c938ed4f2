"""Search tests: the test-only ``toy`` policy family is registered only while a search test runs."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def toy_family():
    from tests.search import toy_policy
    from tuner.policies import registry

    added = toy_policy.register()
    yield
    if added:  # a family that was there before the test (a worker's registration) stays
        registry.unregister("toy")
