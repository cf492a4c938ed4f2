"""Building models: from checkpoints (explicit paths, a weights directory, the shipped ``tiny``) or
with random weights (for benchmarks and tests).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.errors import UserError
from tuner.model.config import NAMED_MODELS, ModelConfig, model_config, require_engine

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


def build_models(config: ModelConfig, device: str | torch.device = "cpu"):
    """Instantiate an uninitialised (zero/default) VAR transformer and VQ-VAE for ``config``."""
    from tuner.model.var import VARTransformer
    from tuner.model.vqvae import VQVAE

    var = VARTransformer(config.var, vae_z=config.vae.z_channels, vocab=config.vae.vocab_size)
    vae = VQVAE(config.vae, config.var.patch_nums)
    return var.to(device).eval(), vae.to(device).eval()


def for_inference(*modules: torch.nn.Module) -> None:
    """Freeze loaded weights: weights that require grad make autocast keep an fp16/bf16 copy of every
    weight for the whole run (about 4 GB for d30), memory that no plan counts."""
    for m in modules:
        m.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random, non-trivial value so that each one affects the output.

    Matrices get ``N(0, 1/fan_in)``, vectors small offsets around their neutral value (1 for norm
    scales), embeddings unit noise, VAR's temperatures ``log 4 ± 0.5``. The VAR head is scaled up
    so logits have a realistic spread for top-k/top-p sampling.
    """
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: d30's 2 GB drawn in a second
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32, device=device)
        if name.endswith("scale_mul_1H11"):
            value = math.log(4.0) + 0.5 * noise
        elif p.dim() >= 2 \
                and not name.endswith(("class_emb.weight", "embedding.weight", "lvl_embed.weight")) \
                and "pos_" not in name and "ada_gss" not in name:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in) * (4.0 if name == "head.weight" else 1.0)
        elif name.endswith("weight") and p.dim() == 1 and ("norm" in name):
            value = 1.0 + 0.1 * noise
        elif p.dim() == 1:
            value = 0.05 * noise
        else:
            value = 0.5 * noise
        p.copy_(value.to(p.dtype))
    return module


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
               random_weights: bool = False, seed: int = 0,
               device: str | torch.device = "cpu") -> LoadedModel:
    """The one entry point the CLI and workers use to get a model (``UserError`` for a model that
    can only be planned, :func:`~tuner.model.config.require_engine`)."""
    if name is not None:
        require_engine(name)
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
