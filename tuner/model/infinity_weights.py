"""Where a named Infinity model's official files live in ``--weights-dir``, and the sharded reader.

The layout is the official ``scripts/infer.sh``'s ``weights/`` folder (FoundationVision/Infinity
@4c27bbb): ``infinity_2b_reg.pth`` + ``infinity_vae_d32_reg.pth`` for 2B, the sharded
``infinity_8b_weights/`` + ``infinity_vae_d56_f8_14_patchify.pth`` for 8B, and ``flan-t5-xl/`` (the
hub folder of google/flan-t5-xl) for the text encoder. ``infinity-test`` (ours) reads
``infinity_test.pth`` + ``infinity_vae_test.pth``. A sharded transformer is a folder with
``pytorch_model.bin.index.json`` or ``model.safetensors.index.json`` (what the official
``checkpoint_type='torch_shard'`` hands to transformers' ``load_sharded_checkpoint``).

Nothing here imports torch at module level; :func:`check_infinity_weights` reads no tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import UserError

TEXT_ENCODER_DIR = "flan-t5-xl"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# model name -> (transformer file or sharded folder, BSQ-VAE file)
WEIGHT_FILES = {
    "infinity-2b": ("infinity_2b_reg.pth", "infinity_vae_d32_reg.pth"),
    "infinity-8b": ("infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth"),
    "infinity-test": ("infinity_test.pth", "infinity_vae_test.pth"),
}


@dataclass(frozen=True)
class InfinityWeightPaths:
    """The three things a real Infinity model loads: transformer (file or sharded folder), VAE, T5 folder."""

    model: Path
    vae: Path
    text_encoder: Path


def infinity_weight_paths(name: str, weights_dir) -> InfinityWeightPaths:
    """The files of ``--model NAME`` in ``weights_dir`` (else ``$TUNER_WEIGHTS_DIR``); not checked."""
    directory = weights_dir or os.environ.get("TUNER_WEIGHTS_DIR")
    model_file, vae_file = WEIGHT_FILES[name]
    if not directory:
        raise UserError(f"--model {name} needs its weights: pass --weights-dir DIR (or set "
                        f"TUNER_WEIGHTS_DIR) with {model_file}, {vae_file} and {TEXT_ENCODER_DIR}/, or use "
                        "--random-weights")
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"--weights-dir {d} is not a directory; pass the folder with {model_file}, "
                        f"{vae_file} and {TEXT_ENCODER_DIR}/ (the official weights/ folder)")
    return InfinityWeightPaths(d / model_file, d / vae_file, d / TEXT_ENCODER_DIR)


def shard_index(folder: Path) -> Path:
    """The index file of a sharded checkpoint folder (one-line UserError when there is none)."""
    for name in INDEX_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} is a folder without {' or '.join(INDEX_FILES)}; pass the official sharded "
                    "folder as downloaded (index and shards)")


def shard_files(folder: Path) -> list[Path]:
    """The shard files an index names, each checked to exist."""
    index = shard_index(folder)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index} is not a checkpoint index (JSON with a weight_map); re-download it") \
            from None
    for n in names:
        if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("."):
            raise UserError(f"{index} names shard {n!r} outside its folder; re-download the index")
        if not (folder / n).is_file():
            raise UserError(f"{index} names shard {n}, which is not in {folder}; re-download the "
                            "missing shards")
    return [folder / n for n in names]


def read_sharded_state_dict(folder: str | Path, what: str = "Infinity"):
    """``name -> Tensor`` of all shards of a sharded checkpoint folder (safetensors, or torch files read
    with ``weights_only=True``); one-line UserError for a missing shard or a duplicated name."""
    from tuner.model.checkpoint import read_state_dict

    out: dict = {}
    for f in shard_files(Path(folder)):
        if f.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise UserError(f"{f} is a safetensors shard and safetensors is not installed; "
                                "pip install -e '.[infinity]'") from None
            try:
                part = load_file(str(f))
            except Exception as exc:  # a truncated or foreign file: safetensors' own error types
                raise UserError(f"{f} is not a readable safetensors shard ({exc}); re-download it") from None
        else:
            part = read_state_dict(f, f"{what} shard")
        clash = next((k for k in part if k in out), None)
        if clash:
            raise UserError(f"{f} repeats tensor {clash} of another shard; re-download the sharded folder")
        out.update(part)
    return out


def check_infinity_weights(name: str, weights_dir) -> InfinityWeightPaths:
    """Cheap, read-only proof that the three parts exist (no tensor read): for commands whose model
    loads late (search workers) or slowly."""
    from tuner.model.text_encoder import check_text_encoder_dir
    from tuner.model.checkpoint_files import check_checkpoint_file

    paths = infinity_weight_paths(name, weights_dir)
    if paths.model.is_dir():
        for f in shard_files(paths.model):
            if f.suffix != ".safetensors":
                check_checkpoint_file(f, "Infinity shard", "--weights-dir")
    elif not paths.model.exists():
        raise UserError(f"{paths.model.name} not found in {paths.model.parent}; put the official file there "
                        "(or use --random-weights)")
    else:
        check_checkpoint_file(paths.model, "Infinity", "--weights-dir")
    if not paths.vae.is_file():
        raise UserError(f"{paths.vae.name} not found in {paths.vae.parent}; put the official BSQ-VAE file "
                        "there (or use --random-weights)")
    check_checkpoint_file(paths.vae, "BSQ-VAE", "--weights-dir")
    check_text_encoder_dir(paths.text_encoder)
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        from tuner.model.text_encoder import INSTALL_HINT

        raise UserError(f"real Infinity weights need the T5 text encoder, read through transformers, which "
                        f"is not installed; {INSTALL_HINT}")
    return paths
