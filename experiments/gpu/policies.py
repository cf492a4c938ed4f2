"""The model and the three policies the GPU check compares: full cache, a paper preset and the joint policy.

- **full**: the official layout (``tuner bench`` without ``--policy``).
- **preset** (default ``ams``): the paper preset fitted to the memory target by its budget knob, as
  ``tuner presets --random-weights --mem-target 15%`` writes it (:func:`tuner.presets.fitted_paper_presets`
  on a calibration of the loaded random weights; the layer roles are meaningless for quality, the
  memory and speed are what is measured).
- **joint**: the joint (``budgets``) policy tiny's 15% search found,
  ``experiments/quant/search-15/policy_tiny_15pct.json``, carried over
  to this model: its form (cap form, selection rule, sink scales) is kept, its per-model sizes are
  re-derived (the curve's length) and its cap is refitted to the same target
  (:func:`tuner.policies.fit.fit_to_memory`). No d16-d30 search has been shipped, so this is the
  only joint policy there is.

Each policy is written as a policy file and read back exactly as ``tuner bench --policy FILE`` does
(:func:`tuner.cli.model_opts.load_policy_option`), so the files are part of what is checked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The joint policy tiny's 15% search found in experiments/quant (per-layer-group int8/int4 storage,
# score selection): the shipped policies/ may be a quantized preset, which has no budgets form.
DEFAULT_JOINT_FILE = ROOT / "experiments" / "quant" / "search-15" / "policy_tiny_15pct.json"


def toy_config():
    """The dry run's model: 4 layers, 1 head of 64, 5 scales (55 tokens); 15% of its cache is reachable.

    Small enough that a generation under the Triton interpreter takes about a second on one core.
    """
    from tuner.model.config import ModelConfig, VAEConfig, VARConfig

    return ModelConfig("toy-d4", VARConfig(depth=4, patch_nums=(1, 2, 3, 4, 5), num_classes=10, embed_dim=64,
                                           num_heads=1),
                       VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                 share_quant_resi=4))


def load(model: str, device: str, seed: int = 0):
    """``tuner bench --model NAME --random-weights``'s model (``toy`` is the dry run's :func:`toy_config`)."""
    from tuner.model.loading import load_model, random_models

    if model == "toy":
        return random_models(toy_config(), seed, device)
    return load_model(model, random_weights=True, seed=seed, device=device)


def calibrate(loaded, samples: int):
    """Calibration statistics of the loaded weights (not cached: random weights have no identity)."""
    from tuner.calibration import CalibrationSpec, load_or_compute_calibration

    return load_or_compute_calibration(loaded.var, loaded.vae, loaded.config, checkpoint_sha256=None,
                                       spec=CalibrationSpec(samples=samples, seed=0))


def transplant_joint(params: dict[str, Any], geometry):
    """A shipped ``budgets`` policy's form on another model's geometry (cap not yet fitted).

    Only what is model-independent carries over: a uniform scale curve (re-sized to this model's
    scales), uniform or absent layer weights, the cap, the rule and its arguments. An explicit table
    or a shaped curve is tied to its model and is refused with a ``ValueError``.
    """
    from tuner.policies.registry import make_policy

    p = dict(params)
    if p.get("table") is not None:
        raise ValueError("the joint policy is an explicit budget table; it cannot be carried to another "
                         "model")
    curve = list(p.get("scale_curve") or [])
    if len(curve) != geometry.num_scales - 1:
        if not curve or len(set(curve)) != 1:
            raise ValueError(f"the joint policy's scale curve {curve} is shaped for another model")
        p["scale_curve"] = (curve[0],) * (geometry.num_scales - 1)
    weights = p.get("layer_weights")
    if weights is not None and len(weights) != geometry.num_layers:
        if len(set(weights)) != 1:
            raise ValueError("the joint policy's layer weights are shaped for another model")
        p["layer_weights"] = None
    return make_policy("budgets", p)  # lists (scale curve, kv_format layer groups) become tuples


@dataclass
class Candidate:
    """One compared policy: display name, the file it was written to, and what ``--policy FILE`` loads."""

    name: str
    note: str
    file: str | None
    policy: Any
    spec: Any


def make_candidates(loaded, *, mem_target: str, preset: str, joint_file: Path, calibration, out: Path,
                    dtype: str) -> list[Candidate]:
    """``[full, preset, joint]`` for ``loaded``; the compressed two written to ``out/*.json`` and read
    back."""
    from tuner.cli.model_opts import load_policy_option
    from tuner.mem_target import parse_mem_target
    from tuner.memory import memory_report
    from tuner.policies.base import CacheGeometry, PolicySpec
    from tuner.policies.fit import fit_to_memory
    from tuner.policy_file import write_policy_file
    from tuner.presets import fitted_paper_presets

    cfg = loaded.config
    geometry = CacheGeometry.from_var_config(cfg.var)
    spec = PolicySpec(geometry, cfg.name, calibration)
    target = parse_mem_target(mem_target)
    fitted = fitted_paper_presets(cfg, calibration, target)
    if fitted.get(preset) is None:
        fits = [n for n, p in fitted.items() if p is not None]
        raise ValueError(f"preset {preset!r} cannot be fitted to {mem_target} on {cfg.name} (fitted: {fits})")

    def fits(policy) -> bool:
        report = memory_report(policy, cfg, spec=spec)
        return target.fits(report.fraction, report.kv_bytes_per_image)

    shipped = json.loads(Path(joint_file).read_text())
    joint = fit_to_memory(transplant_joint(shipped["policy"]["params"], geometry), geometry, fits)
    if joint is None:
        raise ValueError(f"the joint policy of {joint_file} cannot be fitted to {mem_target} on {cfg.name}")

    full_policy, full_spec = load_policy_option(None, loaded)
    out_list = [Candidate("full", "full cache (no --policy)", None, full_policy, full_spec)]
    for name, policy, note in ((f"{preset}@{mem_target}", fitted[preset], f"paper preset {preset} fitted to "
                                f"{mem_target} (tuner presets --mem-target)"),
                               (f"joint@{mem_target}", joint, f"form of {Path(joint_file).name} refitted to "
                                f"{mem_target}")):
        path = out / f"{name.replace('@', '_at_').replace('%', 'pct')}.json"
        write_policy_file(path, policy, cfg, checkpoint_sha256=loaded.checkpoint_sha256,
                          calibration=calibration,
                          dtype=dtype, provenance={"preset": name, "mem_target": mem_target,
                                                   "note": "GPU check (experiments/gpu); random weights"})
        pol, pspec = load_policy_option(str(path), loaded)
        out_list.append(Candidate(name, note, str(path), pol, pspec))
    return out_list
