"""The ``tuner`` command line. ``main`` builds the app lazily; each subcommand lives in its own module."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from tuner.cli.app import build_app

    build_app()(args=argv, prog_name="tuner")
