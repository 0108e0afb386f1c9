"""The README's tour, run as written: every command in it exits 0 (from the repository root's view,
in a scratch folder where `samples` is the repository's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A tour\n", 1)[1].split("\n## ", 1)[0]
    return [line[4:] for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_the_tour_lists_the_main_commands():
    joined = "\n".join(tour_commands())
    for command in ("invert", "reconstruct", "edit", "--mask", "mask", "move", "generate", "batch", "--from"):
        assert f" {command} " in f" {joined} ".replace("\n", " "), command


def test_every_tour_command_exits_0(tmp_path):
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    bin_dir = Path(sys.executable).parent  # the diffedit of this environment first
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in tour_commands():
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
