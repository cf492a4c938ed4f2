"""The ``model`` section of a policy file: the model identity it is written with, the cache geometry
it names, and the check that a file is for a given model (docs/design.md, Tracking and export).

``{"name", "depth", "patch_nums", "num_heads", "head_dim", "checkpoint_sha256"}``, plus
``"scale_shapes"`` (``[h, w]`` per scale, ``patch_nums`` the heights) only for a non-square schedule
(an Infinity aspect ratio other than 1:1): square files are byte for byte what they were before the
field existed, and a file without it names square maps.
"""
from __future__ import annotations

from typing import Any

from tuner.errors import UserError
from tuner.geometry import CacheGeometry


def model_identity(model_cfg: Any, checkpoint_sha256: str | None) -> dict:
    """The ``model`` section for a named model's config (its ``name`` and ``geometry``)."""
    g = model_cfg.geometry
    out = {"name": model_cfg.name, "depth": g.num_layers, "patch_nums": list(g.patch_nums),
           "num_heads": g.num_heads, "head_dim": g.head_dim, "checkpoint_sha256": checkpoint_sha256}
    if g.scale_shapes is not None:  # non-square maps only
        out["scale_shapes"] = [list(hw) for hw in g.scale_shapes]
    return out


def file_geometry(model: dict) -> CacheGeometry:
    """The cache geometry a ``model`` section names (no ``scale_shapes``: square maps);
    ``KeyError`` / ``TypeError`` / ``ValueError`` for a malformed section."""
    return CacheGeometry.from_dict({**model, "num_layers": model["depth"]})


def check_model(where: str, model: dict, geometry: CacheGeometry, model_cfg: Any) -> None:
    """One-line :class:`UserError` unless the file (``model`` section, its ``geometry``) is for
    ``model_cfg``: the same name and cache geometry (layers, heads, head_dim, every scale's map)."""
    want = model_cfg.geometry
    name = model.get("name")
    if name != model_cfg.name or geometry != want:
        hint = "" if geometry.is_square and want.is_square else " with the --aspect/--scales it was made for"
        raise UserError(f"{where} is a policy for model {name} (depth {geometry.num_layers}, "
                        f"{geometry.describe_scales()}), not {model_cfg.name} (depth {want.num_layers}, "
                        f"{want.describe_scales()}); pass --model {name}{hint} or use a policy exported "
                        f"for {model_cfg.name}")
