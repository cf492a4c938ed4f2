"""The zero-generation proxy replays per-head plans (packed cache, ragged kept ids) exactly: heads all
alike score what the per-layer plan scores, and a head that keeps nothing loses attention mass."""
from __future__ import annotations

import pytest

from tests.policies.head_policies import HeadWindows
from tests.quality.test_proxy import record, spec_of, tiny  # noqa: F401  (module fixtures)
from tuner.quality.proxy import proxy_score


@pytest.mark.parametrize("rule", ["recent", "scores"])
def test_equal_heads_score_like_the_uniform_plan(record, rule):  # noqa: F811
    kw = dict(windows=(2,), caps=(12,), rule=rule)
    packed = proxy_score(record, HeadWindows(**kw), spec_of(record))
    uniform = proxy_score(record, HeadWindows(uniform=True, **kw), spec_of(record))
    assert packed.score == uniform.score and packed.lost_mass == uniform.lost_mass
    assert packed.errors == uniform.errors


def test_a_head_that_keeps_nothing_loses_more(record):  # noqa: F811
    keep = proxy_score(record, HeadWindows(windows=(7,), caps=(None,)), spec_of(record))
    assert keep.score == 0.0 and keep.lost_mass == 0.0  # every head keeps every token
    drop = proxy_score(record, HeadWindows(windows=(7, 7, 7, 7), caps=(None, 0, None, None)), spec_of(record))
    assert 0.0 < drop.lost_mass < 1.0 and drop.score > 0.0
