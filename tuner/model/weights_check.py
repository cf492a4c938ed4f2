"""Cheap, read-only proof that a command's weights exist before anything expensive starts.

Commands whose model loads late (search workers after Ray started) or slowly check here first; only
a file's first bytes are read, never a tensor. Messages name the flags the calling command has.
"""
from __future__ import annotations

import os
from pathlib import Path

from tuner.errors import UserError


def _is_torch_checkpoint(path: Path) -> bool:
    """A complete zip archive (torch.save since 1.6) or a legacy torch pickle; reads a few bytes only."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    except OSError:
        return False


def check_checkpoint_file(path: str | Path, what: str, flag: str) -> Path:
    """Cheap, read-only proof that ``path`` can be a checkpoint (exists, readable, torch format)."""
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "not found"
        raise UserError(f"{what} checkpoint {kind}: {p}; pass an existing file with {flag}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} checkpoint {p} is not readable; fix its permissions or pass another file "
                        f"with {flag}")
    if not _is_torch_checkpoint(p):
        raise UserError(f"{p} is not a readable PyTorch checkpoint (not a zip-format torch checkpoint: "
                        f"truncated, corrupt or not a checkpoint); re-download or re-save it and pass it "
                        f"with {flag}")
    return p


def check_weights(model: str, var_ckpt, vae_ckpt, weights_dir, *, random_weights_flag: bool,
                  ckpt_flags: bool = True, random_weights: bool = False) -> None:
    """Find the weights a command will load before it does anything expensive; reads no tensor.

    For commands whose model is loaded late (in search workers, after Ray started) or that lack
    ``--random-weights`` (policy check): the messages name only the flags the command has
    (``random_weights_flag``, ``ckpt_flags`` for ``--var-ckpt/--vae-ckpt``). ``random_weights``: the
    command will use random weights (nothing to check). Infinity models run with random weights only.
    """
    from tuner.model.config import model_config, require_engine
    from tuner.model.loading import VAE_FILE

    require_engine(model)
    if random_weights:
        return  # nothing to find (the loader refuses what cannot run)
    from tuner.model.config import NAMED_MODELS

    if model in NAMED_MODELS and model_config(model).kind == "infinity":
        from tuner.model.infinity_runner import require_random_weights

        require_random_weights(model)
    if (var_ckpt is None) != (vae_ckpt is None):
        raise UserError("pass both --var-ckpt and --vae-ckpt (or neither and use --model NAME)")
    if var_ckpt is not None:
        check_checkpoint_file(var_ckpt, "VAR", "--var-ckpt")
        check_checkpoint_file(vae_ckpt, "VAE", "--vae-ckpt")
        return
    try:
        model_config(model)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; pass --model with one of them") from None
    if model == "tiny":
        return
    directory = weights_dir or os.environ.get("TUNER_WEIGHTS_DIR")
    other = ", or pass --var-ckpt FILE --vae-ckpt FILE" if ckpt_flags else ""
    if random_weights_flag:
        other += ", or use --random-weights"
    if not directory:
        raise UserError(f"--model {model} needs its weights: pass --weights-dir DIR "
                        f"(or set TUNER_WEIGHTS_DIR) with var_{model}.pth and {VAE_FILE}{other}")
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"--weights-dir {d} is not a directory; pass the directory with var_{model}.pth and "
                        f"{VAE_FILE} (or set TUNER_WEIGHTS_DIR){other}")
    for name, what in ((f"var_{model}.pth", "VAR"), (VAE_FILE, "VAE")):
        if not (d / name).is_file():
            raise UserError(f"{name} not found in {d}; put the official file there{other}")
        check_checkpoint_file(d / name, what, "--weights-dir")
