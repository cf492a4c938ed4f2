"""Building models: from checkpoints (explicit paths, a weights directory, the shipped ``tiny``) or
with random weights (for benchmarks and tests); :func:`load_model` also returns Infinity models
(:class:`tuner.model.infinity_runner.InfinityModel`, the same interface).

The interface the product path calls, whatever the kind (docs/design.md, Model engine): ``config``,
``checkpoint_sha256``, ``source``, ``num_conditions`` (classes, prompts), ``condition_name``,
``conditions_key`` (what the conditions add to cache keys), ``softmax_scale`` (what calibration
observers apply to ``q·k``), ``device``, ``note`` (a caveat to print, or None),
``describe_condition(i)`` and ``generate_chunk(conditions, seed=, cfg=, top_k=, top_p=, **engine)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tuner.errors import UserError
from tuner.model.config import NAMED_MODELS, ModelConfig, at_schedule, at_sides, model_config, require_engine
from tuner.model.random_init import for_inference, randomize_  # noqa: F401 - re-exported (older imports)

VAE_FILE = "vae_ch160v4096z32.pth"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class LoadedModel:
    """A ready-to-run model pair and its identity (``checkpoint_sha256`` is None for random weights)."""

    config: ModelConfig
    var: torch.nn.Module
    vae: torch.nn.Module
    checkpoint_sha256: str | None
    source: str

    condition_name = "class"
    conditions_key = ""  # a class id means the same for every VAR: cache keys stay as they were
    note = None

    @property
    def num_conditions(self) -> int:
        return self.config.var.num_classes

    @property
    def softmax_scale(self) -> float:
        return float(getattr(self.var.blocks[0].attn, "softmax_scale", 1.0))

    @property
    def device(self) -> torch.device:
        return next(self.var.parameters()).device

    def describe_condition(self, index: int) -> str:
        return f"class {index}"

    def generate_chunk(self, conditions: Sequence[int] | torch.Tensor, *, seed: int | None, cfg: float,
                       top_k: int, top_p: float, **engine):
        """One batch: :func:`tuner.model.generate.generate` of class ids ``conditions`` ``[B]``."""
        from tuner.model.generate import generate

        labels = torch.as_tensor(conditions, dtype=torch.long, device=self.device)
        return generate(self.var, self.vae, labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, **engine)


def build_models(config: ModelConfig, device: str | torch.device = "cpu"):
    """Instantiate an uninitialised (zero/default) VAR transformer and VQ-VAE for ``config``."""
    from tuner.model.var import VARTransformer
    from tuner.model.vqvae import VQVAE

    var = VARTransformer(config.var, vae_z=config.vae.z_channels, vocab=config.vae.vocab_size)
    vae = VQVAE(config.vae, config.var.patch_nums)
    return var.to(device).eval(), vae.to(device).eval()


def random_models(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """Models of ``config``'s shape with random weights (see :func:`randomize_`), drawn on ``device``:
    the same seed gives the same weights on every CPU (the tests' references), other values on a GPU."""
    var, vae = build_models(config, device)
    randomize_(var, seed)
    randomize_(vae, seed + 1)
    for_inference(var, vae)
    return LoadedModel(config, var, vae, None, f"random weights (seed {seed})")


def load_checkpoints(var_ckpt: str | Path, vae_ckpt: str | Path, name: str | None = None,
                     device: str | torch.device = "cpu") -> LoadedModel:
    """Load official-format state dicts; depth, width and VAE channels come from tensor shapes."""
    from tuner.model.checkpoint import (infer_vae_config, infer_var_config, load_strict, read_state_dict,
                                        sha256_file)

    var_sd = read_state_dict(var_ckpt, "VAR", "--var-ckpt")
    vae_sd = read_state_dict(vae_ckpt, "VAE", "--vae-ckpt")
    var_cfg, vae_z, vocab = infer_var_config(var_sd, f"VAR checkpoint {var_ckpt}")
    vae_cfg = infer_vae_config(vae_sd, f"VAE checkpoint {vae_ckpt}")
    if (vae_z, vocab) != (vae_cfg.z_channels, vae_cfg.vocab_size):
        raise UserError(f"{var_ckpt} expects a VQ-VAE with {vocab} codes of width {vae_z}, but {vae_ckpt} "
                        f"has {vae_cfg.vocab_size}×{vae_cfg.z_channels}; pass the matching --vae-ckpt")
    label = name or f"d{var_cfg.depth}"
    if name in NAMED_MODELS and name != "tiny":
        expected = model_config(name).var
        if (expected.depth, expected.patch_nums) != (var_cfg.depth, var_cfg.patch_nums):
            raise UserError(f"{var_ckpt} holds a depth-{var_cfg.depth} model with {len(var_cfg.patch_nums)} "
                            f"scales, not {name}; pass --model d{var_cfg.depth} or the right file")
    config = ModelConfig(label, var_cfg, vae_cfg)
    var, vae = build_models(config, "cpu")
    load_strict(var, var_sd, f"VAR checkpoint {var_ckpt}")
    load_strict(vae, vae_sd, f"VAE checkpoint {vae_ckpt}", tolerate=("quantize.ema_vocab_hit_SV",))
    digest = sha256_file(var_ckpt)
    var, vae = var.to(device), vae.to(device)
    for_inference(var, vae)
    return LoadedModel(config, var, vae, digest, str(var_ckpt))


def resolve_weight_paths(name: str, weights_dir: str | Path | None) -> tuple[Path, Path]:
    """Where ``--model NAME`` looks for its files: ``--weights-dir``, else ``$TUNER_WEIGHTS_DIR``."""
    if name == "tiny":
        return ASSETS / "tiny" / "var_tiny.pth", ASSETS / "tiny" / "vae_tiny.pth"
    directory = weights_dir or os.environ.get("TUNER_WEIGHTS_DIR")
    if not directory:
        raise UserError(f"--model {name} needs its weights: pass --weights-dir DIR (or set "
                        f"TUNER_WEIGHTS_DIR) with var_{name}.pth and {VAE_FILE}, or use --random-weights")
    d = Path(directory)
    var_path, vae_path = d / f"var_{name}.pth", d / VAE_FILE
    for p in (var_path, vae_path):
        if not p.is_file():
            raise UserError(f"{p.name} not found in {d}; put the official file there or pass "
                            f"--var-ckpt/--vae-ckpt")
    return var_path, vae_path


def load_model(name: str | None = "tiny", *, var_ckpt=None, vae_ckpt=None, weights_dir=None,
               random_weights: bool = False, seed: int = 0, device: str | torch.device = "cpu",
               sides: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
               aspect: str | None = None, scales: int | None = None):
    """The one entry point the CLI and workers use to get a model: a :class:`LoadedModel` (VAR) or an
    :class:`~tuner.model.infinity_runner.InfinityModel` (``UserError`` for a model that can only be
    planned, :func:`~tuner.model.config.require_engine`).

    ``sides`` (Infinity only): the square token maps to generate, a prefix of the schedule.
    ``prompts`` (Infinity only): the prompt set conditions index (default the built-in list).
    ``aspect`` (Infinity only): an official ratio ``H:W`` (``"2:1"``); ``scales``: generate the first N
    maps of the ratio's schedule (:func:`~tuner.model.config.at_schedule`; VAR models refuse both).
    """
    if name is not None:
        require_engine(name)
    cfg = model_config(name) if name in NAMED_MODELS else None
    if aspect is not None or scales is not None:  # Infinity only (one-line error for a VAR model)
        cfg = at_schedule(cfg or model_config("tiny"), sides=sides, aspect=aspect, scales=scales)
    if cfg is not None and cfg.kind == "infinity":
        return _load_infinity(cfg, var_ckpt, weights_dir, random_weights, seed, device, sides, prompts)
    if sides is not None and (name or "tiny") in NAMED_MODELS:
        at_sides(model_config(name or "tiny"), sides)  # refuses: a VAR schedule is fixed
    if prompts is not None:
        raise UserError(f"--model {name or 'tiny'} is class-conditional: it takes no prompts; pass --classes "
                        "(or use an Infinity model)")
    if (var_ckpt is None) != (vae_ckpt is None):
        raise UserError("pass both --var-ckpt and --vae-ckpt (or neither and use --model NAME)")
    if var_ckpt is not None:
        return load_checkpoints(var_ckpt, vae_ckpt, name if name != "tiny" else None, device)
    name = name or "tiny"
    try:
        config = model_config(name)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; pass --model with one of them") from None
    if random_weights:
        return random_models(config, seed, device)
    var_path, vae_path = resolve_weight_paths(name, weights_dir)
    if name == "tiny" and not var_path.is_file():
        raise UserError("the built-in tiny weights are missing from this install; reinstall varkv-tuner "
                        "or train them with experiments/train_tiny.py")
    loaded = load_checkpoints(var_path, vae_path, name, device)
    if name == "tiny":
        loaded.config = ModelConfig("tiny", loaded.config.var, loaded.config.vae)
    return loaded


def _load_infinity(cfg, var_ckpt, weights_dir, random_weights: bool, seed: int, device, sides, prompts):
    from tuner.model.infinity_runner import load_infinity_model

    if var_ckpt is not None:
        raise UserError(f"--model {cfg.name} reads its files from --weights-dir (the official weights/ "
                        "folder), not --var-ckpt/--vae-ckpt; pass --weights-dir DIR or --random-weights")
    return load_infinity_model(at_sides(cfg, sides), random_weights=random_weights, seed=seed, device=device,
                               prompts=tuple(prompts) if prompts is not None else None,
                               weights_dir=weights_dir)
