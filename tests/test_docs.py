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
