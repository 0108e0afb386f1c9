"""The `diffedit` command: a Typer app whose verbs live in one thin module each."""

from __future__ import annotations

import sys

import typer

from diffedit.errors import DiffeditError

app = typer.Typer(
    name="diffedit",
    help="Diffusion-based image inversion and editing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each command module adds its verbs to `app`; imported here so `--help` lists them all.
    from diffedit.cli import generate, invert, models, toy  # noqa: F401


def main() -> None:
    _register()
    try:
        app(standalone_mode=False)
    except DiffeditError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
