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
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from diffedit import __version__

        typer.echo(f"diffedit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Diffusion-based image inversion and editing."""


def _register() -> None:
    # Each command module adds its verbs to `app`; imported here so `--help` lists them all.
    from diffedit.cli import batch, bench, edit, erase, generate, invert, mask, models, move, toy  # noqa: F401


@functools.cache
def commands() -> dict:
    """The app's commands by name (click objects, which list each command's parameters)."""
    _register()
    return dict(typer.main.get_command(app).commands)


invoked: list[str] = []  # the command line `run` was last given, for results folders that record it


def run(argv: list[str] | None = None) -> int:
    """Run the app on `argv` and return the exit code (errors as one line on stderr)."""
    global invoked
    _register()
    args = sys.argv[1:] if argv is None else argv
    invoked = ["diffedit", *args]
    try:
        # not standalone: Click's errors come here, to be printed as one line like ours
        done = typer.main.get_command(app).main(args=args, prog_name="diffedit", standalone_mode=False)
        return done if isinstance(done, int) else 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except typer.TyperException as err:  # Click's usage errors: which option, what is wrong, where help is
        if not err.format_message().strip():  # `diffedit` alone: the help is the answer
            err.show()
            return getattr(err, "exit_code", 2)
        command = next((a for a in args if not a.startswith("-")), "")
        hint = f" (see diffedit {command} -h)" if command in commands() else " (see diffedit -h)"
        typer.echo(f"error: {' '.join(err.format_message().split())}{hint}", err=True)
        return getattr(err, "exit_code", 2)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 130
    except DiffeditError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except OSError as err:  # the system's own failures (a full disk, a permission): not a bug
        typer.echo(f"error: {_one_line(err)}", err=True)
        return 1
    except Exception as err:  # noqa: BLE001 - the last resort: a user never sees a traceback
        if _out_of_memory(err):
            typer.echo(f"error: out of memory ({_one_line(err)}); try a smaller image, --batch-size 1, --dtype fp16, "
                       "--vae-tiling or --offload", err=True)
            return 1
        typer.echo(f"error: {_one_line(err)} (this is a bug in diffedit; the traceback is in {_crash_log()})",
                   err=True)
        return 1
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure (GPU or CPU); the GPU's cached blocks are released, so a
    batch can go on with its next job."""
    import torch

    text = str(err)
    if not (isinstance(err, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror:  # e.g. a full disk: the system's words, not a repr
        text = f"{err.filename + ': ' if err.filename else ''}{err.strerror}"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _crash_log() -> str:
    """Write the current exception's traceback to a log file and return its path."""
    import os
    import tempfile
    import time
    import traceback

    folder = os.environ.get("DIFFEDIT_LOG_DIR") or tempfile.gettempdir()
    path = os.path.join(folder, f"diffedit-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(path, "w") as f:
            f.write(f"diffedit {' '.join(sys.argv)}\n\n{traceback.format_exc()}")
    except OSError:
        return "(no log: it could not be written)"
    return path


def main() -> None:
    sys.exit(run())
