"""``tuner policy show|validate``: read policy files, print them, check them against a model."""
from __future__ import annotations

from typing import Optional

import typer

from tuner.cli.common import user_errors
from tuner.errors import UserError


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Inspect and check policy files.", no_args_is_help=True)
    sub.command("show", help="Print a policy file as a table (and a budget heatmap PNG on request).")(show)
    sub.command("validate", help="Check a policy file against a model; exit 2 with the reason if it does not fit.")(
        validate)
    app.add_typer(sub, name="policy")


def _model(name: str):
    from tuner.model.config import model_config

    try:
        return model_config(name)
    except KeyError as exc:
        raise UserError(f"{exc.args[0]}; pass --model with one of them") from None


@user_errors
def show(path: str = typer.Argument(..., help="Policy file (JSON)."),
         heatmap: Optional[str] = typer.Option(None, "--heatmap", help="Write the budget heatmap PNG here.")) -> None:
    from tuner.memory import plot_budget_heatmap
    from tuner.policy_file import describe_policy_file, load_policy_file

    policy, info = load_policy_file(path)
    typer.echo(describe_policy_file(policy, info))
    if heatmap:
        plot_budget_heatmap(info.plan, heatmap, title=f"{policy.family}")
        typer.echo(f"heatmap: {heatmap}")


@user_errors
def validate(path: str = typer.Argument(..., help="Policy file (JSON)."),
             model: str = typer.Option(..., "--model", help="Model the policy must fit (tiny, d16, ... d36).")) -> None:
    from tuner.policy_file import load_policy_file

    policy, info = load_policy_file(path, _model(model))
    typer.echo(f"ok: {path} is a valid {policy.family} policy for {model} "
               f"({100 * info.memory['fraction']:.2f}% of the full cache)")
