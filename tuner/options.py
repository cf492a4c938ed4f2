"""The option vocabulary every command shares, and its checks (no CLI framework here).

Dtype names, attention backends, the sampling defaults (:data:`SAMPLING` for VAR, the settings of
the papers' FID numbers; :data:`INFINITY_SAMPLING`, the official Infinity CLI's; a model config's
``sampling`` says which one is its own), devices, seeds and integer lists: one home, used by the commands in
:mod:`tuner.cli` and by the search config alike. Every check raises (or returns the message of) a
one-line :class:`~tuner.errors.UserError` naming the flag and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.errors import UserError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SamplingDefaults:
    """Classifier-free guidance and token filtering a model samples with unless told otherwise.

    The defaults are VAR's official FID evaluations (VAR's README): cfg 1.5 ramped over the scales,
    top-k 900, top-p 0.96.
    """

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96

    def as_kwargs(self) -> dict[str, float | int]:
        """``{"cfg": ..., "top_k": ..., "top_p": ...}``: the keyword arguments of every spec and generator."""
        return {"cfg": self.cfg, "top_k": self.top_k, "top_p": self.top_p}


SAMPLING = SamplingDefaults()
# FoundationVision/Infinity tools/run_infinity.py @4c27bbb: --cfg 3 (the same at every scale), --tau 1,
# top_k 900 (a no-op on bits unless 1) and top_p 0.97.
INFINITY_SAMPLING = SamplingDefaults(cfg=3.0, top_k=900, top_p=0.97)


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> str:
    if value not in choices:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    return value


def check_device_name(name: str) -> str:
    """``name`` must parse as a torch device (``cpu``, ``cuda``, ``cuda:N`` ...) or be ``auto``."""
    if name in ("", "auto"):
        return name
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    return name


def resolve_device(name: str | None, hint: str = "use --device cpu") -> str:
    """``None``/``auto`` → cuda when available, else cpu; a CUDA device without CUDA is an error.

    ``hint`` is the fix the error names (a command that can run on a remote cluster says so).
    """
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is visible; {hint}")
    dev = torch.device(name)
    if dev.type == "cuda":  # counted without creating a CUDA context (search drivers stay off the GPU)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0; {hint}")
    elif dev.type == "meta":
        raise UserError(f"--device {name} holds no data and cannot generate images; {hint}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=name)
        except Exception as exc:  # noqa: BLE001 - cuda:9 on a 1-GPU machine, mps off macOS, ...
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:100]
            raise UserError(f"--device {name} is not usable here ({reason}); {hint}") from None
    return name


def resolve_backend(name: str, device: str) -> str:
    check_choice(name, BACKENDS, "--attention-backend")
    from varkv_kernels.dispatch import resolve_backend as _resolve

    try:
        return _resolve(name, device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def parse_int_list(text: str, flag: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag} is empty; give comma-separated integers like 207,360")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers like 207,360") from None


def sampling_problem(cfg: float, top_k: int, top_p: float) -> str | None:
    """What is wrong with the sampling flags (``--cfg``, ``--top-k``, ``--top-p``), or None.

    The one rule of every command that samples (generate, search); callers raise the message as
    their own error type.
    """
    if not math.isfinite(cfg) or cfg < 0:
        return f"--cfg {cfg} must be a finite number >= 0 (1.5 is the FID setting; 0 disables guidance)"
    if top_k < 0:
        return f"--top-k {top_k} is negative; use 0 to disable top-k filtering"
    if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
        return f"--top-p {top_p} is outside [0, 1]; use 0 to disable nucleus filtering"
    return None


def check_sampling(cfg: float, top_k: int, top_p: float) -> None:
    """:func:`sampling_problem` as a :class:`UserError`."""
    problem = sampling_problem(cfg, top_k, top_p)
    if problem:
        raise UserError(problem)


SEED_MAX = 2**62  # torch generators take 64-bit seeds; later batches use seed + i


SAMPLER_SEED_MAX = 2**32 - 1  # numpy's RandomState (Optuna's samplers)


def seed_problem(seed: int, high: int = SEED_MAX, flag: str = "--seed") -> str | None:
    """Why ``seed`` cannot seed the generators, or None."""
    if not 0 <= seed <= high:
        return f"{flag} {seed} is out of range; use an integer from 0 to {high}"
    return None


def check_seed(seed: int, high: int = SEED_MAX, flag: str = "--seed") -> None:
    problem = seed_problem(seed, high, flag)
    if problem:
        raise UserError(problem)
