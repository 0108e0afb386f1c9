"""`diffedit batch`: run a JSONL manifest of jobs (see diffedit.cli.manifest)."""

from __future__ import annotations

import json as jsonlib
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import JsonOpt, QuietOpt, stderr
from diffedit.cli.main import app

SOME_FAILED = 3


@app.command()
def batch(
    manifest: Annotated[str, typer.Argument(help="JSONL manifest, one job per line, or - for stdin.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-d", help="Folder for every output and results.jsonl.")],
    resume: Annotated[bool, typer.Option("--resume", help="Skip jobs already done (result row ok and outputs present).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Run up to N consecutive generate jobs that differ only in prompt, seed and output as one batch.")] = 1,
    contact_sheet: Annotated[Path | None, typer.Option("--contact-sheet", help="Write a PNG with each job's input and outputs side by side (after the merge).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let jobs replace files in the out dir that this batch did not write.")] = False,
    json: JsonOpt = False, quiet: QuietOpt = False,
):
    """Run every job of MANIFEST, loading each model once; exit code 3 when some jobs failed.

    A line is a job for any command, keys named as the command's arguments and options:
    {"id": "cat-17", "command": "edit", "image": "in/cat.png", "target": "a dog", "engine": "ddpm-ef"}

    Example: diffedit batch jobs.jsonl --out-dir out/ --resume
    """
    from diffedit.cli import manifest as jobs_lib
    from diffedit.errors import DiffeditError

    if contact_sheet is not None and contact_sheet.exists() and not resume:
        raise DiffeditError(f"{contact_sheet}: already exists (the contact sheet never overwrites without --resume)")
    entries, base, name = jobs_lib.read_manifest(manifest)
    jobs = jobs_lib.plan(entries, base, out_dir, name)
    rank, world = jobs_lib.shard()
    share = sum(1 for j in jobs if j.index % world == rank)
    failures = 0

    with _progress(share, quiet) as advance:
        def on_row(row: dict, skipped: bool) -> None:
            nonlocal failures
            failures += row["status"] != "ok"
            if json and not skipped:
                typer.echo(jsonlib.dumps(row))
            advance(failures)

        rows, merged = jobs_lib.run_batch(jobs, out_dir, resume=resume, batch_size=batch_size,
                                           overwrite=overwrite, on_row=on_row)

    if not quiet:
        _summary(rows, merged, rank, world)
    if contact_sheet is not None and merged is not None:  # drawn by the process that merged all rows
        from diffedit.images import save_image

        sheet = _contact_sheet(jobs, jobs_lib.read_rows(merged), out_dir)
        if sheet is not None:
            save_image(sheet, contact_sheet, overwrite=True)
    if failures:
        raise typer.Exit(SOME_FAILED)


@contextmanager
def _progress(total: int, quiet: bool):
    """A Rich bar with ETA and a live failure count on a terminal; nothing in pipes and logs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if quiet or not stderr.is_terminal:
        yield lambda failures: None
        return
    columns = [TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("[red]{task.fields[failed]} failed")]
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("batch", total=total, failed=0)
        yield lambda failures: progress.update(task, advance=1, failed=failures)


def _summary(rows: list[dict], merged: Path | None, rank: int, world: int) -> None:
    from rich.table import Table

    ok = sum(r["status"] == "ok" for r in rows)
    failed = [r for r in rows if r["status"] != "ok"]
    table = Table(title=f"batch{f' rank {rank}/{world}' if world > 1 else ''}: {ok} ok, {len(failed)} failed",
                  title_justify="left")
    for column in ("id", "command", "status", "seconds", "error"):
        table.add_column(column)
    for r in failed[:20] or rows[:10]:
        table.add_row(r["id"], r["command"], r["status"], f"{r['seconds']:.2f}", r["error"] or "")
    stderr.print(table)
    if merged is not None:
        stderr.print(f"results: {merged}")


def _contact_sheet(jobs, rows: list[dict], out_dir: Path, size: int = 128):
    """Input | outputs, one row per successful job with images, labelled with its id."""
    from PIL import Image, ImageDraw, ImageOps

    from diffedit.images import FORMATS

    by_id = {j.id: j for j in jobs}
    lines = []
    for row in rows:
        if row["status"] != "ok":
            continue
        job = by_id[row["id"]]
        paths = [job.image] if job.image is not None and job.image.exists() else []
        paths += [out_dir / o for o in row["outputs"]]
        tiles = []
        for path in paths:
            if path.suffix.lower() in FORMATS:
                with Image.open(path) as img:
                    tiles.append(ImageOps.contain(img.convert("RGB"), (size, size)))
        if tiles:
            lines.append((row["id"], tiles))
    if not lines:
        return None
    columns, label = max(len(t) for _, t in lines), 14
    sheet = Image.new("RGB", (columns * (size + 4) + 4, len(lines) * (size + label + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (job_id, tiles) in enumerate(lines):
        top = 4 + y * (size + label + 4)
        draw.text((4, top), job_id, fill="black")
        for x, tile in enumerate(tiles):
            sheet.paste(tile, (4 + x * (size + 4), top + label))
    return sheet
