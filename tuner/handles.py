"""The Python API's handles (docs/design.md, API): a loaded model and a loaded, checked policy.

Both are frozen: a handle names what was loaded and from where, and the API functions
(:mod:`tuner.api`) and the official-VAR drop-in (:mod:`tuner.dropin`) read them. Building one does the
work (reading files, checking them); a handle itself holds no logic beyond its identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.geometry import CacheGeometry
from tuner.policies.base import CachePlan, KVPolicy, PolicySpec


@dataclass(frozen=True)
class Model:
    """A ready-to-run model pair: ``tuner.load_model(...)``.

    var, vae: the engine's transformer (VAR, or Infinity's) and its tokenizer decoder (multi-scale
    VQ-VAE, or BSQ-VAE), frozen fp32 weights on ``device``. config: its
    :class:`~tuner.model.config.ModelConfig` or :class:`~tuner.model.infinity_config.InfinityModelConfig`
    (``kind`` says which). checkpoint_sha256: sha256 of the transformer checkpoint (None for random
    weights). source: where the weights came from. device: the torch device name (``cpu``, ``cuda``,
    ``cuda:1``). dtype: compute dtype of generation, ``fp32`` or ``fp16``/``bf16`` (autocast over the
    fp32 weights, as the official demo). runner: the loaded model the CLI runs
    (:class:`~tuner.model.loading.LoadedModel` or :class:`~tuner.model.infinity_runner.InfinityModel`:
    an Infinity model's text encoder and prompt set live there).
    """

    config: Any
    var: Any
    vae: Any
    checkpoint_sha256: str | None
    source: str
    device: str
    dtype: str = "fp32"
    runner: Any = None

    @property
    def kind(self) -> str:
        """``var`` (class-conditional) or ``infinity`` (text-to-image)."""
        return self.config.kind

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        """Classes of a VAR model (0 for a text-to-image model: it takes prompts)."""
        return self.config.var.num_classes if self.kind == "var" else 0

    @property
    def resolution(self) -> int:
        """Side of the generated images in pixels (``H = W``; the height at a non-square ratio)."""
        return self.config.resolution

    @property
    def geometry(self) -> CacheGeometry:
        return self.config.geometry

    def __repr__(self) -> str:  # the modules' repr is pages long
        what = f"{self.num_classes} classes" if self.kind == "var" else "text-to-image"
        return (f"Model({self.name!r}, {self.resolution}px, {what}, "
                f"source={self.source!r}, device={self.device!r}, dtype={self.dtype!r})")


@dataclass(frozen=True)
class Policy:
    """A policy file, loaded and checked: ``tuner.load_policy(path, model=None)``.

    policy: the family's policy object. spec: what it plans against (the file's geometry, model
    name and embedded calibration). info: the file's other sections
    (:class:`~tuner.policy_file.PolicyFileInfo`: memory, metrics, provenance). checked_for:
    ``(model name, checkpoint sha256)`` of the model it was checked against, None when loaded
    without one (then :func:`tuner.api.generate` checks it against the model it is used with).
    """

    path: str
    policy: KVPolicy
    spec: PolicySpec
    info: Any
    checked_for: tuple[str, str | None] | None = None

    @classmethod
    def from_file(cls, path: str | Path, model_config: Any = None,
                  checkpoint_sha256: str | None = None) -> "Policy":
        """Load ``path`` strictly (:func:`tuner.policy_file.load_policy_file`); with ``model_config``, it
        must be a policy for that model (name, depth, heads, patch_nums; the checkpoint hash too when
        both are known), else a one-line :class:`~tuner.errors.UserError`."""
        from tuner.policy_file import load_policy_file
        from tuner.policy_model import file_geometry

        policy, info = load_policy_file(path, model_config, checkpoint_sha256=checkpoint_sha256)
        m = info.model
        geometry = file_geometry(m)
        spec = PolicySpec(geometry, str(m.get("name", "")), info.calibration)
        checked = (model_config.name, checkpoint_sha256) if model_config is not None else None
        return cls(str(path), policy, spec, info, checked)

    @property
    def family(self) -> str:
        return self.policy.family

    @property
    def geometry(self) -> CacheGeometry:
        return self.spec.geometry

    @property
    def plan(self) -> CachePlan:
        """The budget table (``budgets[layer][scale]`` tokens) and per-layer storage formats."""
        return self.info.plan

    @property
    def memory_fraction(self) -> float:
        """The file's planned KV bytes over the full 16-bit cache's (docs/design.md, Memory)."""
        return float(self.info.memory["fraction"])

    def __repr__(self) -> str:
        return (f"Policy({self.path!r}, family={self.family!r}, model={self.spec.model_name!r}, "
                f"memory {100 * self.memory_fraction:.2f}% of the full cache)")
