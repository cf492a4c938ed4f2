"""Options shared by every command that runs a model, and the code that turns them into one."""
from __future__ import annotations

from typing import Optional

import typer

ModelOpt = typer.Option("tiny", "--model", help="Named model: tiny (built in), d16, d20, d24, d30, d36; "
                                                 "Infinity (text-to-image): infinity-test (ours, small), "
                                                 "infinity-2b, infinity-8b (official files in "
                                                 "--weights-dir, or --random-weights).")
VarCkptOpt = typer.Option(None, "--var-ckpt", help="Path of an official-format VAR state dict (var_d*.pth).")
VaeCkptOpt = typer.Option(None, "--vae-ckpt", help="Path of the VQ-VAE state dict (vae_ch160v4096z32.pth).")
WeightsDirOpt = typer.Option(None, "--weights-dir", envvar="TUNER_WEIGHTS_DIR",
                             help="Directory with var_<model>.pth and vae_ch160v4096z32.pth; Infinity: the "
                                  "official weights/ folder (infinity_2b_reg.pth + infinity_vae_d32_reg.pth, "
                                  "or infinity_8b_weights/ + infinity_vae_d56_f8_14_patchify.pth; and "
                                  "flan-t5-xl/, read with pip install -e '.[infinity]').")
RandomWeightsOpt = typer.Option(False, "--random-weights", help="Use random weights of the model's shape "
                                "(Infinity: with seeded random text features instead of a T5 encoder's).")
SidesOpt = typer.Option(None, "--sides", help="Infinity only: the square token maps to generate, a prefix of "
                        "the 1:1 schedule 1,2,4,6,8,12,16,20,24,32,40,48,64 (16 px per token: 1,2,4,6 is "
                        "96 px; default: the model's whole schedule). Other ratios: --aspect with "
                        "--scales N.")
AspectOpt = typer.Option(None, "--aspect", help="Infinity only: an official aspect ratio H:W "
                         "(height:width): 1:1 (default), 5:4, 4:3, 3:2, 7:4, 2:1, 5:2, 3:1 and their "
                         "transposes 4:5, 3:4, 2:3, 4:7, 1:2, 2:5, 1:3; the official (h, w) maps of that "
                         "ratio (2:1 at 1M: 90x45 tokens, a 1440x720 image). The model keeps its number of "
                         "scales (infinity-test: 4).")
ScalesOpt = typer.Option(None, "--scales", help="Infinity only: generate the first N scales of the ratio's "
                         "schedule (13 at 1M; 7, 10, 12 are the official 0.06M, 0.25M, 0.60M). Any ratio; "
                         "at 1:1 --scales 4 equals --sides 1,2,4,6. Not with --sides.")
PromptsOpt = typer.Option(None, "--prompts", help="Infinity only: a text file, one prompt per line (default: "
                          "a built-in list of 16). With random weights a prompt only seeds random text "
                          "features.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (non-fp32 runs under autocast).")
BackendOpt = typer.Option("auto", "--attention-backend",
                          help="auto (triton on CUDA, torch on CPU), torch or triton.")
PolicyOpt = typer.Option(None, "--policy", help="Policy file (JSON) to apply; default: full cache.")
# Validated and applied by tuner.threads.apply_threads; why 1 is often faster: tuner/threads.py.
ThreadsOpt = typer.Option(None, "--threads",
                          help="Torch CPU threads for this process (default: torch's, one per core). "
                               "Use 1 when anything else runs on the machine.")


def check_schedule_options(sides: Optional[str], aspect: Optional[str], scales: Optional[int]) -> None:
    """The schedule flags' own checks, before any model or torch is loaded: ``--sides`` a list of
    integers, ``--aspect`` an official ratio, ``--scales`` at least 1 and not with ``--sides``
    (whether they fit the model is checked when it is loaded: :func:`tuner.model.config.at_schedule`)."""
    from tuner.errors import UserError
    from tuner.model.config import parse_aspect

    parse_sides(sides)
    if aspect is not None:
        parse_aspect(aspect)
    if scales is not None and scales < 1:
        raise UserError(f"--scales {scales} must be at least 1 (the first N maps of the schedule)")
    if scales is not None and sides is not None:
        raise UserError("pass --sides (square maps of the 1:1 schedule) or --scales N (the first N maps of "
                        "any ratio), not both")


def parse_sides(sides: Optional[str]) -> Optional[list[int]]:
    """``--sides 1,2,4,6`` → ``[1, 2, 4, 6]`` (None when not given); whether they fit the model is
    checked when it is loaded."""
    from tuner.options import parse_int_list

    return None if sides is None else parse_int_list(sides, "--sides")


def read_prompts_option(model: str, prompts: Optional[str]) -> Optional[tuple[str, ...]]:
    """The prompts of ``--prompts FILE`` (None when not given), read before any model loads; refused
    for a class-conditional model."""
    if prompts is None:
        return None
    from tuner.errors import UserError
    from tuner.model.config import NAMED_MODELS, model_config
    from tuner.model.prompts import read_prompts

    if model not in NAMED_MODELS or model_config(model).kind != "infinity":
        raise UserError(f"--prompts needs a text-to-image model (infinity-test, infinity-2b, infinity-8b); "
                        f"--model {model} is class-conditional")
    return read_prompts(prompts)


def load_model_from_options(model: Optional[str], var_ckpt, vae_ckpt, weights_dir, random_weights: bool,
                            device: str, seed: int = 0, sides: Optional[str] = None,
                            prompts: Optional[tuple[str, ...]] = None, aspect: Optional[str] = None,
                            scales: Optional[int] = None):
    """The loaded model for the CLI options (a :class:`~tuner.model.loading.LoadedModel`, or an
    :class:`~tuner.model.infinity_runner.InfinityModel`: the same interface)."""
    from tuner.model.loading import load_model

    return load_model(model, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt, weights_dir=weights_dir,
                      random_weights=random_weights, seed=seed, device=device, sides=parse_sides(sides),
                      prompts=prompts, aspect=aspect, scales=scales)


def schedule_config(cfg, sides: Optional[str], aspect: Optional[str], scales: Optional[int]):
    """``cfg`` (a named model's config) at the schedule flags, for commands that plan without loading a
    model (``tuner plan``, ``tuner policy validate``)."""
    from tuner.model.config import at_schedule

    check_schedule_options(sides, aspect, scales)
    return at_schedule(cfg, sides=parse_sides(sides), aspect=aspect, scales=scales)


def load_policy_option(path: Optional[str], loaded):
    """``(policy, PolicySpec)`` for ``--policy FILE`` (full cache when ``None``)."""
    from tuner.policies.base import PolicySpec
    from tuner.policies.full import FullPolicy

    geometry = loaded.config.geometry
    if path is None:
        return FullPolicy(), PolicySpec(geometry, loaded.config.name)
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(path, loaded.config, checkpoint_sha256=loaded.checkpoint_sha256)
    spec = PolicySpec(geometry, loaded.config.name, getattr(info, "calibration", None))
    return policy, spec
