"""Shared CLI plumbing: the UserError → one-line message + exit 2 wrapper, and torch dtypes."""
from __future__ import annotations

import functools
from typing import Callable

import typer

from tuner.errors import UserError
from tuner.options import DTYPE_NAMES, check_choice


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


def torch_dtype(name: str):
    import torch

    check_choice(name, DTYPE_NAMES, "--dtype")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
