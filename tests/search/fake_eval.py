"""A fast, deterministic stand-in for :func:`tuner.quality.evaluate.build_evaluator` (tests only).

Quality is a smooth function of the planned memory fraction (more cache → closer to the full cache)
plus a small deterministic per-policy offset, so searches behave like real ones in milliseconds.
Options (all optional, via ``--evaluator-arg key=value`` or ``evaluator_kwargs``):

- ``log``: append one JSON line per *finished* evaluation (pid, family, params, spec seed) to this file;
- ``crash_once``: a marker path; the first evaluation whose family params contain ``tag: crash``
  kills its own process (SIGKILL) after creating the marker, later ones succeed;
- ``hang_once``: same with ``tag: hang`` but sleeps for a long time instead;
- ``tag: crash_always`` kills the process on every attempt;
- ``sleep``: seconds each evaluation takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass

from tests.search import toy_policy


@dataclass(frozen=True)
class EvalSpec:
    labels: tuple
    seed: int = 0
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    batch_size: int = 32


class FakeEvaluator:
    def __init__(self, model: str = "tiny", log: str | None = None, crash_once: str | None = None,
                 hang_once: str | None = None, sleep: float | str = 0.0, **_ignored):
        from tuner.model.config import model_config

        self.model_cfg = model_config(model)
        self.model_hash = f"fake-{model}"
        self.log, self.crash_once, self.hang_once, self.sleep = log, crash_once, hang_once, float(sleep)

    def describe(self) -> dict:
        return {"num_classes": self.model_cfg.var.num_classes, "calibration": self.calibration().to_dict()}

    def calibration(self):
        """Synthetic but deterministic statistics of the right shape (real families plan with them)."""
        from tuner.calibration import Calibration, CalibrationSpec
        from tuner.cli.policy_opts import placeholder_heads

        g = self.model_cfg.geometry  # any named model (VAR or Infinity): only the shapes matter
        n, s = g.num_layers, g.num_scales

        def table(fn):
            return tuple(tuple(None if j == 0 else fn(i, j) for j in range(s)) for i in range(n))

        density = tuple(tuple(tuple(1.0 if k <= j else 0.0 for k in range(s)) for j in range(s))
                        for _ in range(n))
        return Calibration(self.model_cfg.name, tuple(g.patch_nums), n,
                           key_similarity=table(lambda i, j: -1.0 - 0.37 * ((i * 5) % n)),
                           car=table(lambda i, j: 0.3 + 0.05 * ((i + j) % 4)),
                           htk=table(lambda i, j: 0.2 + 0.03 * ((3 * i + j) % 7)),
                           density=density, spec=CalibrationSpec(), checkpoint_sha256=self.model_hash,
                           heads=placeholder_heads(n, g.num_heads, s), scale_shapes=g.scale_shapes)

    def _once(self, marker: str | None) -> bool:
        if marker is None or os.path.exists(marker):
            return False
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        return True

    def evaluate(self, family: str, params: dict, spec: EvalSpec) -> dict:
        from tuner.memory import memory_report
        from tuner.policies.base import PolicySpec
        from tuner.policies.registry import make_policy

        if (params.get("tag") == "crash" and self._once(self.crash_once)
                or params.get("tag") == "crash_always"):
            os.kill(os.getpid(), signal.SIGKILL)
        if params.get("tag") == "hang" and self._once(self.hang_once):
            time.sleep(3600)
        if self.sleep:
            time.sleep(self.sleep)
        policy = make_policy(family, params)
        pspec = PolicySpec(self.model_cfg.geometry, self.model_cfg.name,
                           self.calibration())
        rep = memory_report(policy, self.model_cfg, dtype="fp16", cfg=True, spec=pspec)
        frac = float(rep.fraction)
        digest = hashlib.sha256(json.dumps([family, params], sort_keys=True).encode()).digest()
        jitter = digest[0] / 255.0  # in [0, 1], fixed per policy
        seed_shift = 0.01 * (spec.seed % 7)  # held-out seeds give slightly different numbers
        fid = 20.0 * (1.0 - frac) ** 2 + 0.5 * jitter + seed_shift
        out = {"memory_fraction": frac, "kv_bytes_per_image": float(rep.kv_bytes_per_image),
               "fid_vs_full": 0.0 if family == "full" else fid,
               "psnr": 60.0 if family == "full" else 15.0 + 25.0 * frac - jitter,
               "ssim": 1.0 if family == "full" else 0.5 + 0.45 * frac, "latency_s_per_image": 0.001,
               "samples": float(len(spec.labels))}
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "family": family, "params": params,
                                     "seed": spec.seed, "n": len(spec.labels)}, sort_keys=True) + "\n")
        return out


def build(**kwargs) -> FakeEvaluator:
    toy_policy.register()  # worker processes evaluate toy policies too
    return FakeEvaluator(**kwargs)


def build_missing_weights(**kwargs):
    """A factory failing like the real one does without checkpoints (a UserError naming the file)."""
    from tuner.errors import UserError

    raise UserError("checkpoint var_d30.pth not found in /nowhere; put it there or pass --weights-dir")


class GridFakeEvaluator(FakeEvaluator):
    """The fake evaluator with synthetic comparison-grid images (the real ones need the real engine):
    ``[N, 3, 3, 8, 8]``, full cache grey, the policy a shade fixed per policy, their ×4 difference."""

    def grid_columns(self, family: str, params: dict, request: dict):
        import torch

        n = len(request["labels"])
        shade = hashlib.sha256(json.dumps([family, params], sort_keys=True).encode()).digest()[0] / 255.0
        full = torch.full((n, 3, 8, 8), 0.5)
        policy = torch.full((n, 3, 8, 8), shade)
        return torch.stack([full, policy, ((policy - full).abs() * 4).clamp(0, 1)], dim=1)


def build_with_grids(**kwargs) -> GridFakeEvaluator:
    toy_policy.register()
    return GridFakeEvaluator(**kwargs)
