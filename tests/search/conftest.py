"""Search tests: the test-only ``toy`` policy family is registered only while a search test runs."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def toy_family(monkeypatch):
    from tests.search.toy_policy import TARGET
    from tuner.policies import registry

    monkeypatch.setitem(registry._FAMILIES, "toy", TARGET)
    yield
