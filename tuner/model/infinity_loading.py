"""Building Infinity models: random weights at any size, or official-format state dicts loaded strictly.

The transformer file is the official slim state dict (``infinity_2b_reg.pth``: ``name -> Tensor``);
the BSQ-VAE file holds its state dict under ``"vae"`` (``infinity_vae_d32_reg.pth``), as the
official ``vae_model`` reads it. Depth, width, heads, bits and text sizes come from tensor shapes.
Every failure is one :class:`~tuner.errors.UserError` naming the file, the problem keys and the fix;
files are read with ``torch.load(..., weights_only=True)`` (no pickled code runs).

What is not loaded, on purpose: the VAE's ``encoder.*`` (inference never encodes) and the
quantizer's ``mask`` buffers (``quantizer.*`` / ``quantize.*``, bit weights the bit-label path does
not read); in the transformer file, the training-time buffers the official ``load_state_dict`` also
drops (:data:`MODEL_SKIPPED`). Everything else must match exactly (the official loaders are lenient:
``strict=False`` and ``load_cnn`` skip unknown names silently). A sharded transformer (the official
8B ``torch_shard`` folder) is read shard by shard (:mod:`tuner.model.infinity_weights`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.errors import UserError
from tuner.model.bsq_vae import BSQVAE
from tuner.model.checkpoint import load_strict, read_state_dict, sha256_file
from tuner.model.infinity import InfinityEngineConfig, InfinityTransformer
from tuner.model.infinity_config import BSQVAEConfig, InfinityConfig, InfinityModelConfig
from tuner.model.random_init import for_inference, randomize_

VAE_SKIPPED = ("encoder.", "quantizer.", "quantize.")
# Buffers of other training configurations that the official ``Infinity.load_state_dict`` pops.
MODEL_SKIPPED = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


@dataclass
class LoadedInfinity:
    """A ready-to-run Infinity transformer and BSQ-VAE, and their identity (no sha256 for random weights)."""

    config: InfinityModelConfig
    engine: InfinityEngineConfig
    model: InfinityTransformer
    vae: BSQVAE
    checkpoint_sha256: str | None
    source: str


def pair_problem(engine: InfinityEngineConfig, vae_cfg: BSQVAEConfig) -> str | None:
    """Why this transformer cannot decode through this BSQ-VAE, or None: its tokens hold the VAE's bits,
    or 4× them (spatial patchify, 2×2 latent cells per token)."""
    d, z = engine.arch.codebook_dim, vae_cfg.codebook_dim
    if d in (z, 4 * z):
        return None
    return (f"the transformer predicts {d} bits per token but the BSQ-VAE has {z}-bit codes "
            f"(needs {d} or {d // 4})")


def build_infinity(engine: InfinityEngineConfig, vae_cfg: BSQVAEConfig,
                   device: str | torch.device = "cpu") -> tuple[InfinityTransformer, BSQVAE]:
    """Uninitialised (zero/default) modules of these shapes, in eval mode."""
    return InfinityTransformer(engine).to(device).eval(), BSQVAE(vae_cfg).to(device).eval()


def random_infinity(engine: InfinityEngineConfig, vae_cfg: BSQVAEConfig, seed: int = 0,
                    device: str | torch.device = "cpu", name: str = "infinity-random") -> LoadedInfinity:
    """Random weights (:func:`tuner.model.loading.randomize_`: each parameter non-trivial) at any size.
    Raises ``ValueError`` when the VAE cannot decode the transformer's bits."""
    problem = pair_problem(engine, vae_cfg)
    if problem:
        raise ValueError(problem)
    model, vae = build_infinity(engine, vae_cfg, device)
    randomize_(model, seed)
    randomize_(vae, seed + 1)
    for_inference(model, vae)
    return LoadedInfinity(InfinityModelConfig(name, engine.arch, vae_cfg), engine, model, vae, None,
                          f"random weights (seed {seed})")


def _count(sd: dict, pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    if not found:
        raise KeyError(pattern.replace("\\", "").replace("(d+)", "N"))
    return 1 + max(found)


def infer_infinity_config(sd: dict[str, torch.Tensor], source: str, sides: tuple[int, ...] | None = None,
                          h_div_w: float = 1.0, pixels: str = "1M", *,
                          scales: int | None = None) -> InfinityEngineConfig:
    """The architecture of an official-format Infinity state dict, from its tensor shapes, generating
    ``sides`` (the maps' heights, a prefix of the ``h_div_w`` schedule) or its first ``scales`` maps."""
    if "cfg_uncond" not in sd or "word_embed.weight" not in sd:
        vae = any(k.startswith("decoder.") for k in sd)
        hint = ("it holds a BSQ-VAE (decoder.*); swap the two files" if vae
                else "pass the official infinity_*.pth (a text-to-image Infinity state dict)")
        raise UserError(f"{source} is not an Infinity transformer checkpoint (no cfg_uncond / word_embed); "
                        f"{hint}")
    if not any(k.startswith("block_chunks.") for k in sd):
        raise UserError(f"{source} has no block_chunks.* tensors (blocks saved with block_chunks=1?); pass "
                        "the official file, whose blocks are grouped in chunks")
    try:
        chunks = _count(sd, r"block_chunks\.(\d+)\.")
        per = _count(sd, r"block_chunks\.0\.module\.(\d+)\.")
        first = "block_chunks.0.module.0."
        width, bits = sd["word_embed.weight"].shape
        heads = sd[first + "sa.scale_mul_1H11"].shape[1]
        hidden = sd[first + "ffn.fc1.weight"].shape[0]
        maxlen, text_channels = sd["cfg_uncond"].shape
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"{source} is missing Infinity tensors ({exc}); pass an unmodified official "
                        "checkpoint") from None
    try:
        arch = InfinityConfig(depth=chunks * per, embed_dim=int(width), num_heads=int(heads),
                              mlp_ratio=hidden / width, codebook_dim=int(bits),
                              text_channels=int(text_channels), text_maxlen=int(maxlen), h_div_w=h_div_w,
                              pixels=pixels)
        if arch.ffn_hidden != hidden:
            raise ValueError(f"FFN width {hidden} is not the official round(width · ratio / 256) · 256")
    except ValueError as exc:
        raise UserError(f"{source}: {exc}; pass an official-format Infinity checkpoint") from None
    try:
        if scales is not None:
            return InfinityEngineConfig.first_scales(arch, scales, block_chunks=chunks)
        return InfinityEngineConfig(arch, sides=sides, block_chunks=chunks)
    except ValueError as exc:  # sides that are not the schedule's prefix, or too many scales
        raise UserError(f"{exc}; pass sides (heights) that start the official schedule, or fewer "
                        "scales") from None


_CONV_WRAPPERS = ("conv_in", "conv_out", "conv1", "conv2", "nin_shortcut")
_NORM_WRAPPERS = ("norm_out", "norm1", "norm2")


def _vae_key(key: str) -> str:
    """Map an official flat name (``decoder.conv_in.weight``) onto the wrappers'
    (``decoder.conv_in.conv.weight``), as the official ``load_cnn`` accepts both; wrapper names and
    other names are kept."""
    path, _, leaf = key.rpartition(".")
    parts = path.split(".")
    if parts[-1] in _CONV_WRAPPERS or parts[-2:] == ["upsample", "conv"]:
        return f"{path}.conv.{leaf}"
    if parts[-1] in _NORM_WRAPPERS:
        return f"{path}.norm.{leaf}"
    return key


def prepare_vae_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the tensors inference does not use (:data:`VAE_SKIPPED`), map flat names to the wrappers'."""
    return {_vae_key(k): v for k, v in sd.items() if not k.startswith(VAE_SKIPPED)}


def infer_bsq_config(sd: dict[str, torch.Tensor], source: str) -> BSQVAEConfig:
    """The decoder's shape from an official BSQ-VAE state dict (after :func:`prepare_vae_state`)."""
    if "cfg_uncond" in sd:
        raise UserError(f"{source} holds an Infinity transformer, not a BSQ-VAE; swap the two files")
    try:
        z = sd["decoder.conv_in.conv.weight"].shape[1]
        levels = _count(sd, r"decoder\.up\.(\d+)\.")
        widths = [sd[f"decoder.up.{i}.block.0.conv2.conv.weight"].shape[0] for i in range(levels)]
        blocks = _count(sd, r"decoder\.up\.0\.block\.(\d+)\.")
        ups = sum(1 for i in range(levels) if f"decoder.up.{i}.upsample.conv.conv.weight" in sd)
        base = widths[0]
        return BSQVAEConfig(codebook_dim=int(z), patch_size=2 ** ups, base_ch=int(base),
                            ch_mult=tuple(int(w) // int(base) for w in widths), num_res_blocks=blocks - 1)
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(f"{source} is not an official BSQ-VAE decoder state dict ({exc}); pass "
                        "infinity_vae_*.pth") from None


def load_infinity_state(engine: InfinityEngineConfig, vae_cfg: BSQVAEConfig, model_sd: dict, vae_sd: dict,
                        model_source: str = "Infinity checkpoint", vae_source: str = "BSQ-VAE checkpoint",
                        device: str | torch.device = "cpu") -> tuple[InfinityTransformer, BSQVAE]:
    """Build and strictly load both modules from official-format state dicts (missing / unexpected /
    mis-shaped keys: one UserError). ``vae_sd`` may use flat or wrapper names; skipped prefixes are
    dropped."""
    model, vae = build_infinity(engine, vae_cfg, "cpu")
    load_strict(model, {k: v for k, v in model_sd.items() if k not in MODEL_SKIPPED}, model_source)
    load_strict(vae, prepare_vae_state(vae_sd), vae_source)
    model, vae = model.to(device), vae.to(device)
    for_inference(model, vae)
    return model, vae


def load_infinity(model_path: str | Path, vae_path: str | Path, *, name: str | None = None,
                  sides: tuple[int, ...] | None = None, h_div_w: float = 1.0, pixels: str = "1M",
                  device: str | torch.device = "cpu", scales: int | None = None) -> LoadedInfinity:
    """Load the official transformer and BSQ-VAE files; shapes from the tensors, ``name`` checked.

    ``name``: a named model (``infinity-2b`` …) whose architecture the files must have. ``h_div_w``:
    the aspect-ratio template (1.0, 2.0, 0.5, 1.333 …). ``sides``: the heights of the maps to generate
    (at 1:1 the square sides), a prefix of the ``h_div_w`` / ``pixels`` schedule, or ``scales``: its
    first ``scales`` maps (default all of it).
    """
    from tuner.model.infinity_config import INFINITY_MODELS

    from tuner.model.infinity_weights import read_sharded_state_dict, shard_files

    model_src, vae_src = f"Infinity checkpoint {model_path}", f"BSQ-VAE checkpoint {vae_path}"
    sharded = Path(model_path).is_dir()
    model_sd = read_sharded_state_dict(model_path) if sharded else read_state_dict(model_path, "Infinity")
    vae_sd = read_state_dict(vae_path, "BSQ-VAE", inner="vae")
    engine = infer_infinity_config(model_sd, model_src, sides, h_div_w, pixels, scales=scales)
    vae_sd = prepare_vae_state(vae_sd)
    vae_cfg = infer_bsq_config(vae_sd, vae_src)
    problem = pair_problem(engine, vae_cfg)
    if problem:
        raise UserError(f"{model_path} and {vae_path} do not belong together: {problem}; pass the "
                        "matching VAE")
    if name in INFINITY_MODELS:
        want, got = INFINITY_MODELS[name]().infinity, engine.arch
        if (want.depth, want.embed_dim, want.num_heads) != (got.depth, got.embed_dim, got.num_heads):
            raise UserError(f"{model_path} holds a depth-{got.depth} width-{got.embed_dim} model, not "
                            f"{name}; pass the right file")
    model, vae = load_infinity_state(engine, vae_cfg, model_sd, vae_sd, model_src, vae_src, device)
    label = name or f"infinity-d{engine.arch.depth}"
    if sharded:  # one identity for the folder: the hash of its shards' hashes, in index order
        digest = hashlib.sha256("".join(sha256_file(f) for f in shard_files(Path(model_path))).encode())
        sha = digest.hexdigest()
    else:
        sha = sha256_file(model_path)
    return LoadedInfinity(InfinityModelConfig(label, engine.arch, vae_cfg), engine, model, vae, sha,
                          str(model_path))
