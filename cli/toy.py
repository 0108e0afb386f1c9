"""`diffedit toy ...`: the toy world (shapes data, checker, toy model training)."""

import typer

from diffedit.cli.main import app

toy_app = typer.Typer(help="The toy shapes world: data, checker, toy model training.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
