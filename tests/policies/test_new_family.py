"""A family is one file plus one registration.

``layer_stride`` is defined in this file only, registered once (with its own search-space file) and
then found wherever a shipped family is: fitted to a memory target by ``fit_to_memory``, searchable
with ``tuner search --family layer_stride``, part of ``--family all``, in the conformance matrix, in
the real engine and under the compressed-engine oracle. It is unregistered when the module ends.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from tests.policies.cases import case_ids
from tests.policies.helpers import D30, TINY, spec_for
from tests.policies.test_conformance import GEOMETRIES, check_cases_are_well_formed
from tests.policies.test_conformance import check_plan_is_valid_and_fits
from tests.policies.test_conformance import check_select_returns_exactly_the_budget
from tests.policies.test_engine import LABELS, check_allocated_bytes_equal_planned
from tests.policies.test_engine_oracle import check_attention_oracle, runs
from tuner.memory import memory_report
from tuner.policies import registry
from tuner.policies.base import CachePlan, KVPolicy, MemoryKnob, PolicySpec, SelectionState
from tuner.policies.selection import check_int, recent_indices, rule_description, scale_window_row

NAME = "layer_stride"


@dataclass(frozen=True)
class LayerStridePolicy(KVPolicy):
    """Every ``stride``-th layer (0, stride, 2·stride, …) keeps every earlier scale, the others the last
    ``window`` scales; ``max_tokens`` caps every layer at that many of its most recent tokens.

    Budgets: layer ``l`` keeps ``min(tokens of its scales, max_tokens)`` after each scale (0 after the
    last); selection: the most recent tokens. Memory knob: ``max_tokens``.
    """

    stride: int = 2
    window: int = 1
    max_tokens: int | None = None

    family = NAME

    def __post_init__(self) -> None:
        check_int("stride", self.stride, 1)
        check_int("window", self.window, 1)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        windows = [g.num_scales if layer % self.stride == 0 else self.window for layer in range(g.num_layers)]
        return CachePlan(tuple(scale_window_row(g, w, 0, self.max_tokens) for w in windows))

    def select(self, state: SelectionState):
        return recent_indices(state)

    def selection(self, geometry) -> dict:
        return rule_description("recent")

    def memory_knob(self, geometry) -> MemoryKnob:
        return MemoryKnob.tokens(geometry, lambda v: replace(self, max_tokens=int(v)))

    @classmethod
    def conformance_cases(cls, geometry) -> list[dict]:
        return [{"params": {"stride": 1}, "keeps_all": True},
                {"params": {"stride": 2}},
                {"params": {"stride": 3, "window": 2, "max_tokens": 6}}]


SPACE = f"""\
schema_version: 1
description: the layer_stride family of tests/policies/test_new_family.py
families:
  {NAME}:
    params:
      stride: {{type: int, low: 1, high: num_layers}}
      window: {{type: int, low: 1, high: "num_scales - 1"}}
      max_tokens: {{type: int, low: 1, high: cached_before_last, log: true}}
"""


@pytest.fixture(scope="module", autouse=True)
def layer_stride(tmp_path_factory):
    """The one registration; afterwards the family is gone from every vocabulary again."""
    from tuner.search.space_files import family_choices

    space = tmp_path_factory.mktemp("layer_stride") / f"{NAME}.yaml"
    space.write_text(SPACE)
    before = registry.family_names()
    registry.register(NAME, LayerStridePolicy, space=space)
    yield space
    for family in set(registry.family_names()) - set(before):  # ours, and ``toy`` from the fake evaluator
        registry.unregister(family)
    assert NAME not in registry.family_names() and NAME not in family_choices()


def test_registered_once_and_not_a_product_family(layer_stride):
    reg = registry.registration(NAME)
    assert reg.target is LayerStridePolicy and reg.space == layer_stride and not reg.product
    assert registry.make_policy(NAME, {"stride": 3}) == LayerStridePolicy(stride=3)
    assert registry.register(NAME, LayerStridePolicy, space=layer_stride) == reg  # the same again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.register(NAME, "tuner.policies.window:WindowPolicy")
    with pytest.raises(ValueError, match="must agree"):
        registry.register("other_name", LayerStridePolicy)
    with pytest.raises(ValueError, match="lower-case"):
        registry.register("all", LayerStridePolicy)


@pytest.mark.parametrize("g", [TINY, D30], ids=["tiny", "d30"])
@pytest.mark.parametrize("target", [0.10, 0.25])
def test_fitted_to_a_memory_target(g, target):
    from tuner.policies.fit import fit_to_memory

    spec = spec_for(g, calibrated=False)

    def fraction(p):
        return memory_report(p, g, spec=spec).fraction

    fitted = fit_to_memory(LayerStridePolicy(stride=2), g, lambda p: fraction(p) <= target)
    assert isinstance(fitted, LayerStridePolicy) and fitted.stride == 2 and fitted.max_tokens is not None
    assert fraction(fitted) <= target < fraction(replace(fitted, max_tokens=fitted.max_tokens + 1))


def test_in_the_conformance_matrix():
    ids = [i for f, i in case_ids() if f == NAME]
    assert ids == [0, 1, 2]
    check_cases_are_well_formed(NAME)
    for index in ids:
        for geometry in GEOMETRIES:
            check_plan_is_valid_and_fits(NAME, index, geometry)
        for geometry in ("small", "tiny"):
            check_select_returns_exactly_the_budget(NAME, index, geometry)


def test_in_the_engine_and_the_compressed_engine_oracle(small_model):
    from tuner.model.generate import generate

    full_images = generate(small_model.var, small_model.vae, LABELS, seed=11).images
    checked = 0
    for family, index, backend in runs([NAME]):  # every case with torch, one through the Triton kernel
        if backend == "torch":
            check_allocated_bytes_equal_planned(small_model, full_images, family, index)
        checked += check_attention_oracle(small_model, family, index, backend).checked
    assert checked == 4 * small_model.config.var.depth * len(small_model.config.var.patch_nums)


def _search(tmp_path, family: str):
    from tests.search.helpers import config
    from tuner.search.driver import run_search

    cfg = config(tmp_path, space=None, family=family, trials=4, samples=4, final_samples=4, presets=False,
                 mem_target="15%", out=tmp_path / family)
    return cfg, run_search(cfg, progress=False)


def test_searchable_with_family(tmp_path):
    from tuner.search.space_files import family_choices, family_help

    assert NAME in family_choices() and NAME in family_help()
    cfg, result = _search(tmp_path, NAME)
    # its knob refitted to the target, every parameter point of this one-knob family is one plan: the
    # repeats are duplicates (not counted) until the search calls the space exhausted
    counted = sum(r.counts for r in result.records)
    assert cfg.family == NAME and (counted == 4 or (counted >= 1 and "exhausted" in result.stop_reason))
    assert {r.family for r in result.records} == {NAME}
    evaluated = [r for r in result.records if r.evaluated]
    assert evaluated and all(r.metrics["memory_fraction"] <= 0.15 for r in evaluated)  # fitted to the target
    assert all(r.params["max_tokens"] is not None for r in evaluated)
    assert result.policy_path is not None


def test_in_all(tmp_path):
    import optuna

    from tuner.search.space_files import load_space, space_path_for

    space = load_space(space_path_for("all"), TINY)
    assert space.family_names == ["ams", "scalekv", "budgets", "hack", "heatkv", NAME]
    cfg, result = _search(tmp_path, "all")
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)
    assert NAME in study.trials[0].distributions["family"].choices
    assert sum(r.counts for r in result.records) == 4
