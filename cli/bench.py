"""`diffedit bench ...`: benchmarks measured side by side in one run (see benchmarks/)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import JsonOpt, stderr
from diffedit.cli.main import app

bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _write(rows: list[dict], table: str, save: Path | None) -> None:
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        (save / "results.json").write_text(jsonlib.dumps(rows, indent=2) + "\n")
        (save / "results.md").write_text(table + "\n")


@bench_app.command("overhead")
def overhead(
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repetitions; medians are reported.")] = 5,
    quick: Annotated[bool, typer.Option(help="Tiny model only, 20 steps.")] = False,
    save: Annotated[Path | None, typer.Option(help="Folder for results.json and results.md.")] = None,
    json: JsonOpt = False,
):
    """Our generate loop vs NFE x bare forward, and vs diffusers' StableDiffusionPipeline.

    Example: diffedit bench overhead --save benchmarks/results/overhead
    """
    from diffedit.benchmarks import overhead as bench

    with stderr.status("measuring"):
        rows = bench.run(repeats=repeats, quick=quick)
    table = bench.markdown(rows)
    _write(rows, table, save)
    if json:
        for row in rows:
            typer.echo(jsonlib.dumps(row))
    else:
        typer.echo(table)
