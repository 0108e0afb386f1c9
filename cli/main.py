"""The `diffedit` command: a Typer app whose verbs live in one thin module each."""

from __future__ import annotations

import functools
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
    from diffedit.cli import batch, bench, edit, erase, generate, invert, mask, models, move, toy  # noqa: F401


@functools.cache
def commands() -> dict:
    """The app's commands by name (click objects, which list each command's parameters)."""
    _register()
    return dict(typer.main.get_command(app).commands)


def run(argv: list[str] | None = None) -> int:
    """Run the app on `argv` and return the exit code (errors as one line on stderr)."""
    _register()
    try:
        app(args=argv)  # standalone: usage errors print themselves and exit with code 2
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except DiffeditError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    return 0


def main() -> None:
    sys.exit(run())
