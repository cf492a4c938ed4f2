"""``python -m tests.search.cli_entry search ...``: the search commands on a bare typer app, so the
subprocess tests do not depend on how the product CLI registers them. Also registers the toy family."""
from __future__ import annotations

import typer

from tests.search import toy_policy
from tuner.cli.search_cmd import register

toy_policy.register()
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app()
