"""A search from Python: ``tuner.search(mem_target="15%", ...)`` (also ``tuner.search_policy``).

The same :class:`~tuner.search.config.SearchConfig` that ``tuner search`` builds from its flags
(:func:`search_config`), run by the same driver. It lives in the search package, not in
:mod:`tuner.api`, so that the package itself can be called (:mod:`tuner.search`'s ``__init__``) without
importing a higher layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SearchSummary:
    """What a search found: the exported policy file (None when interrupted or nothing fit), the study
    and where it is stored, why it stopped, and the final comparison rows (full cache, presets, winner
    on held-out seeds; dicts of metric name → value)."""

    policy_path: Path | None
    study_name: str
    storage: str
    out_dir: Path
    stop_reason: str
    interrupted: bool
    trials: int
    comparison: tuple[dict, ...]
    config: Any


def search_config(**flags: Any):
    """The frozen :class:`~tuner.search.config.SearchConfig` that ``tuner search`` builds from the same
    values: keyword names are :func:`~tuner.search.config.resolve_config`'s (``mem_target="15%"``,
    ``fid_limit``, ``trials``, ``samples``, ``timeout_s``, ``backend``, ``presets``, ``fit_memory`` ...)."""
    from tuner.search.config import resolve_config

    return resolve_config(**flags)


def search_policy(*, progress: bool = False, **flags: Any) -> SearchSummary:
    """Run (or resume) ``tuner search`` from Python: :func:`search_config` ``(**flags)``, then the CLI's
    driver.

    progress: the live display on stderr (off by default; one line per trial is printed either way).
    """
    from tuner.search import driver

    config = search_config(**flags)
    result = driver.run_search(config, progress=progress)
    return SearchSummary(result.policy_path, result.study_name, result.storage, Path(result.out_dir),
                         result.stop_reason, result.interrupted, len(result.records),
                         tuple(dict(row) for row in result.comparison), config)
