"""Cheap, read-only proof that a command's weights exist before anything expensive starts.

Commands whose model loads late (search workers after Ray started) or slowly check here first; only
a file's first bytes are read, never a tensor. Messages name the flags the calling command has.
"""
from __future__ import annotations

import os
from pathlib import Path

from tuner.errors import UserError
from tuner.model.checkpoint_files import check_checkpoint_file

__all__ = ["check_checkpoint_file", "check_weights"]


def check_weights(model: str, var_ckpt, vae_ckpt, weights_dir, *, random_weights_flag: bool,
                  ckpt_flags: bool = True, random_weights: bool = False) -> None:
    """Find the weights a command will load before it does anything expensive; reads no tensor.

    For commands whose model is loaded late (in search workers, after Ray started) or that lack
    ``--random-weights`` (policy check): the messages name only the flags the command has
    (``random_weights_flag``, ``ckpt_flags`` for ``--var-ckpt/--vae-ckpt``). ``random_weights``: the
    command will use random weights (nothing to check). Infinity models: the official files and the
    T5 folder in ``--weights-dir`` (:func:`tuner.model.infinity_weights.check_infinity_weights`).
    """
    from tuner.model.config import model_config, require_engine
    from tuner.model.loading import VAE_FILE

    require_engine(model)
    if random_weights:
        return  # nothing to find (the loader refuses what cannot run)
    from tuner.model.config import NAMED_MODELS

    if model in NAMED_MODELS and model_config(model).kind == "infinity":
        from tuner.model.infinity_weights import check_infinity_weights

        if var_ckpt is not None or vae_ckpt is not None:
            raise UserError(f"--model {model} reads its files from --weights-dir (the official weights/ "
                            "folder), not --var-ckpt/--vae-ckpt; pass --weights-dir DIR")
        check_infinity_weights(model, weights_dir)
        return
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
