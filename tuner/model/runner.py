"""One loaded model, whatever its kind, from what a caller holds (docs/design.md, Model engine).

The per-model passes (calibration, per-head statistics, the proxy record) take a loaded model (the
interface of :class:`tuner.model.loading.LoadedModel`) or, as they always have, the modules and the
config: ``f(var, vae, model_cfg, ...)``. :func:`as_runner` turns either into the loaded model; the
one choice by kind is here.
"""
from __future__ import annotations

from typing import Any


def as_runner(model: Any, vae: Any = None, model_cfg: Any = None) -> Any:
    """``model`` itself when it is a loaded model (``vae`` and ``model_cfg`` None), else the loaded model
    of the modules ``model`` (transformer) and ``vae`` for ``model_cfg`` (no checkpoint identity;
    an Infinity model gets the built-in prompts)."""
    if vae is None and model_cfg is None:
        if not callable(getattr(model, "generate_chunk", None)):
            raise TypeError("pass a loaded model (tuner.model.loading.load_model) or (transformer, vae, "
                            "model config)")
        return model
    if getattr(model_cfg, "kind", "var") == "infinity":
        from tuner.model.infinity_runner import InfinityModel

        return InfinityModel(model_cfg, model, vae, None, "modules")
    from tuner.model.loading import LoadedModel

    return LoadedModel(model_cfg, model, vae, None, "modules")


def cache_key(loaded: Any) -> str:
    """A loaded model's identity in cache keys: the checkpoint hash (``random:<source>`` for random
    weights), then what its conditions mean (an Infinity prompt set; nothing for VAR) and, for a
    non-square Infinity schedule, its maps (the same weights at another aspect ratio make other
    images). VAR and square keys are what they always were."""
    base = loaded.checkpoint_sha256 or f"random:{loaded.source}"
    extra = loaded.conditions_key
    geometry = loaded.config.geometry
    if not geometry.is_square:
        from tuner.geometry import format_shapes

        extra = f"{extra}|scales:{format_shapes(geometry.shapes)}"
    return f"{base}|{extra}" if extra else base
