"""Assembles the typer application from the subcommand modules (imported only when the CLI runs)."""
from __future__ import annotations

import importlib

import typer

# (module, attribute) of each subcommand's ``register(app)`` function, in help order.
COMMAND_MODULES = (
    "tuner.cli.search_cmd",
    "tuner.cli.generate_cmd",
    "tuner.cli.evaluate_cmd",
    "tuner.cli.plan_cmd",
    "tuner.cli.policy_cmd",
    "tuner.cli.calibrate_cmd",
    "tuner.cli.presets_cmd",
    "tuner.cli.bench_cmd",
)


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="tuner",
        help="Find and apply KV-cache policies for next-scale visual autoregressive models (VAR).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)
    return app
