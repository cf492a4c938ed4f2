"""The ``tuner`` command line. ``main`` builds the app lazily; each subcommand lives in its own module."""
from __future__ import annotations


def usage_error_line(exc) -> str:
    """Click's usage error (unknown option, bad integer, missing argument ...) as the one ``error:`` line.

    Click would print a usage banner, a hint and ``Error: ...`` over several lines; the project's rule
    for bad input is one line naming the problem and the fix.
    """
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "tuner"
    message = " ".join(exc.format_message().split()).rstrip(".")
    return f"error: {message}; see `{command} --help`"


def main(argv: list[str] | None = None) -> None:
    import sys

    import typer

    from tuner.cli.app import build_app

    try:  # typer >= 0.20 vendors its click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover - older typer runs on click itself
        from click import exceptions as click_exc

    command = typer.main.get_command(build_app())
    try:
        code = command.main(args=argv, prog_name="tuner", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:  # bare `tuner` / `tuner policy`: the help text
        exc.show()
        sys.exit(exc.exit_code)
    except click_exc.UsageError as exc:
        typer.echo(usage_error_line(exc), err=True)
        sys.exit(exc.exit_code)
    except click_exc.ClickException as exc:  # e.g. click.FileError
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
