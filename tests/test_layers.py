"""The layer contracts of pyproject.toml hold (import-linter), and the math imports nothing above it."""

import json
import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_the_math_imports_nothing_above_it():
    code = "import sys, json, diffedit.sampling; print(json.dumps(sorted(m for m in sys.modules if m.startswith('diffedit'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == ["diffedit", "diffedit.sampling"]
    upper = ("diffedit.editing", "diffedit.guidance", "diffedit.inversion", "diffedit.cli", "diffedit.jobs")
    assert not [m for m in loaded if m.startswith(upper)]
