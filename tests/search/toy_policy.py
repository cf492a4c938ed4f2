"""A test-only policy family ``toy`` (keep the last ``window`` scales, optionally fewer tokens on odd
layers). Lets the search tests run independently of the real families' semantics; the shipped
spaces are tested against the real families separately.

Registered for the duration of each search test by ``tests/search/conftest.py`` and, in worker
and subprocess drivers, by :func:`register` (called by the fake evaluator's factory and the CLI entry).
"""
from __future__ import annotations

from dataclasses import dataclass

from tuner.policies import registry
from tuner.policies.base import CachePlan, KVPolicy, PolicySpec, SelectionState


@dataclass(frozen=True)
class ToyPolicy(KVPolicy):
    window: int = 2
    odd_layers_half: bool = False
    tag: str = "a"

    family = "toy"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.tag == "invalid":
            raise ValueError("tag 'invalid' is rejected")

    def plan_tokens(self, spec: PolicySpec) -> CachePlan:
        g = spec.geometry
        rows = []
        for layer in range(g.num_layers):
            row = []
            for s in range(g.num_scales - 1):
                lo = max(0, s - self.window + 1)
                b = sum(g.scale_lengths[lo:s + 1])
                if self.odd_layers_half and layer % 2 == 1:
                    b = min(b, max(row[-1] if row else 0, 0) + g.scale_lengths[s]) // 2
                row.append(b)
            row.append(0)
            rows.append(tuple(row))
        return CachePlan(tuple(rows))

    def select(self, state: SelectionState):
        import torch

        n = state.n_candidates
        return torch.arange(n - state.budget, n, device=state.positions.device)


TARGET = f"{__name__}:ToyPolicy"


def register() -> bool:
    """Add ``toy`` to the registry of this process (idempotent); True when this call added it.

    No space file: ``toy`` is not searchable by ``--family`` (the tests pass ``--space``), so the
    shipped ``all`` stays the product families' union.
    """
    if "toy" in registry.family_names():
        return False
    registry.register("toy", TARGET)
    return True
