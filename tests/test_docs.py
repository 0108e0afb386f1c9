"""The docs' benchmark tables are generated from benchmarks/results: the committed file must be current."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_benchmarks_is_generated_from_the_results():
    from lab.benchmarks import docs

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        expected = docs.render()
    finally:
        os.chdir(cwd)
    assert (ROOT / "docs" / "benchmarks.md").read_text() == expected, "run `diffedit bench docs` and commit"


def _tables(text: str) -> list[tuple[str, list[str]]]:
    """(header, rows) of every markdown table in `text`."""
    lines, tables, i = [line.strip() for line in text.splitlines()], [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and lines[i + 1].startswith("|---"):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            tables.append((lines[i], lines[i + 2 : j]))
            i = j
        else:
            i += 1
    return tables


def _measured(row: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in row.strip("|").split("|"))[1:]  # the label may be reworded


def test_benchmark_tables_quoted_in_the_docs_match_the_results():
    """Where a page quotes a benchmark's table (its header is a results table's), every row's numbers
    are those of a row in benchmarks/results: quoted tables cannot drift from the measurements."""
    results: dict[str, set] = {}
    for path in (ROOT / "benchmarks" / "results").glob("*/results.md"):
        for header, rows in _tables(path.read_text()):
            results.setdefault(header, set()).update(_measured(r) for r in rows)
    quoted = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for header, rows in _tables(page.read_text()):
            if header in results:
                quoted += 1
                stale = [r for r in rows if _measured(r) not in results[header]]
                assert not stale, f"{page.name}: rows not in benchmarks/results: {stale[:2]}"
    assert quoted >= 10  # the check reads the pages' tables at all


def test_every_results_row_sits_in_a_table_of_the_docs():
    """Sections merge the tables of several result folders; a folder's notes below its table (the costs
    line of `bench scale`) must not cut the merged table, or the rows after them render as loose text."""
    from lab.benchmarks import docs

    in_tables = {row for _, rows in _tables((ROOT / "docs" / "benchmarks.md").read_text()) for row in rows}
    for _, _, folders in docs.SECTIONS:
        for folder in folders:
            path = ROOT / docs.RESULTS / folder / "results.md"
            rows = {row for _, rows in _tables(path.read_text()) for row in rows} if path.exists() else set()
            assert rows <= in_tables, f"{folder}: rows outside any table of docs/benchmarks.md"


def test_toy_tables_script_lists_every_table_and_skips_what_it_is_told():
    """`benchmarks/toy-tables.sh --list` names the commands it would run; `--skip REGEX` leaves out the
    matching ones (after a new UNet, the flow model's and the VAE's tables), `--only REGEX` keeps only
    them, and a bare --skip or --only is refused."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toy-tables.sh"
    listed = lambda *args: subprocess.run(["bash", str(script), "--list", *args], capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout.splitlines()
    every, unet_only = listed(), listed("--skip", "toy-flow|bench vae")
    assert any("toy-flow" in line for line in every) and any("bench vae" in line for line in every)
    assert unet_only and not any("toy-flow" in line or "bench vae" in line for line in unet_only)
    assert set(unet_only) < set(every)
    assert all("benchmarks/results/" in line for line in every)
    held_out = listed("--only", "heldout")
    measured = [line for line in held_out if "bench compare" not in line]  # comparisons read saved runs
    assert measured and all("--tasks samples/shapesbench-heldout.jsonl" in line for line in measured)
    assert set(held_out) < set(every) and not set(held_out) & set(listed("--skip", "heldout"))
    for option in ("--skip", "--only"):
        refused = subprocess.run(["bash", str(script), option], capture_output=True, text=True)
        assert refused.returncode == 2 and f"{option} needs" in refused.stderr
