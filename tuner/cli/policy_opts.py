"""Building a policy from ``--family NAME --param k=v`` flags, and placeholder calibration for planning."""
from __future__ import annotations

from tuner.errors import UserError


def parse_params(items: list[str] | None) -> dict:
    """``["window=2", "theta_quantile=0.25", "c_min=null"]`` → dict with YAML-typed values."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param {item!r} must look like name=value (e.g. --param window=2)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--param {item!r}: cannot read the value {value!r}") from None
    return out


def policy_from_flags(family: str, params: list[str] | None):
    from tuner.policies.registry import make_policy

    try:
        return make_policy(family, parse_params(params))
    except ValueError as exc:
        raise UserError(f"{exc}; see `tuner plan --help` for the families and their parameters") from None


def placeholder_calibration(model_cfg):
    """Statistics with a fixed, arbitrary layer order, for memory planning without weights.

    ``model_cfg``: any named model's config (VAR or Infinity: only its ``geometry`` and ``name`` are read).

    Memory of ``ams`` (quantile threshold) and ``scalekv`` depends only on how many layers/pairs get
    each role, not on which; the layer roles this implies are arbitrary and flagged as such.
    """
    from tuner.calibration import Calibration, CalibrationSpec

    g = model_cfg.geometry
    n, s = g.num_layers, g.num_scales
    sim = tuple(tuple(None if j == 0 else -float(layer + 1) for j in range(s)) for layer in range(n))
    car = tuple(tuple(None if j == 0 else 0.5 for j in range(s)) for _ in range(n))
    htk = tuple(tuple(None if j == 0 else 0.1 + 0.01 * ((layer * 7 + j) % n) for j in range(s))
                for layer in range(n))
    dens = tuple(tuple(tuple(1.0 if k <= q else 0.0 for k in range(s)) for q in range(s)) for _ in range(n))
    return Calibration(model_cfg.name, tuple(g.patch_nums), n, sim, car, htk, dens,
                       CalibrationSpec(samples=1), checkpoint_sha256="placeholder",
                       heads=placeholder_heads(n, g.num_heads, s), scale_shapes=g.scale_shapes)


def placeholder_heads(layers: int, heads: int, scales: int):
    """Per-head statistics in a fixed, arbitrary order (head roles and HeatKV's ranking are made up;
    ``hack``'s memory depends only on how many heads are contextual, so it is exact)."""
    from tuner.calibration_head_summary import HeadCalibration

    def scas(layer: int, h: int, j: int) -> float | None:
        return None if j == scales - 1 else 1.0 / (1 + (layer * 7 + h * 3 + j) % 11)

    return HeadCalibration(
        scas=tuple(tuple(tuple(scas(layer, h, j) for j in range(scales)) for h in range(heads))
                   for layer in range(layers)),
        history_mass=tuple(tuple(tuple(0.0 if j == 0 else 0.5 for j in range(scales)) for _ in range(heads))
                           for _ in range(layers)),
        dispersion=tuple(tuple(0.5 + ((layer * 5 + h * 3) % 7) / 14 for h in range(heads))
                         for layer in range(layers)))
