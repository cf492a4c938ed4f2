"""Shared CLI plumbing: the UserError → one-line message + exit 2 wrapper, option parsers."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

import typer

from tuner.errors import UserError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "torch", "triton")


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`UserError` into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> str:
    if value not in choices:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    return value


def torch_dtype(name: str):
    import torch

    check_choice(name, DTYPE_NAMES, "--dtype")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def resolve_device(name: str | None) -> str:
    """``None``/``auto`` → cuda when available, else cpu; a CUDA device without CUDA is an error."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is visible; use --device cpu")
    try:
        torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    return name


def resolve_backend(name: str, device: str) -> str:
    check_choice(name, BACKENDS, "--attention-backend")
    from kernels.dispatch import resolve_backend as _resolve

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


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and prove it is writable before any expensive work starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".tuner-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {p} is not writable ({exc.strerror or exc}); pass a writable {flag}") from None
    return p


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
