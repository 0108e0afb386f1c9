"""Shared fixtures: tiny in-code pipelines of every family, saved folders, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffedit.families import adapter_for
from lab.testing import FAMILIES, save_tiny_pipeline, tiny_pipeline

# Short text sequences keep the T5 encoders of tiny SD3/Flux fast; diffusers gets the same value.
SEQ = {"sd3": 16, "flux": 16}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny():
    """tiny(family) -> (diffusers pipeline, our adapter), built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            pipe = tiny_pipeline(family)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = (pipe, adapter_for(pipe, family, SEQ.get(family)))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(family, seed=0) -> path of a saved tiny pipeline folder."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in cache:
            cache[key] = save_tiny_pipeline(family, root / f"tiny-{family}-{seed}", seed)
        return cache[key]

    return get


@pytest.fixture
def square(tmp_path) -> str:
    """A 32x32 PNG: a red square on a light grey background (the prompt "a red square")."""
    import numpy as np
    from PIL import Image

    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 8:20] = (220, 20, 20)
    Image.fromarray(a).save(tmp_path / "square.png")
    return str(tmp_path / "square.png")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: cli(*args) -> (exit code, stdout, stderr)."""
    from diffedit.cli.main import run

    def call(*args):
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def run_subprocess(args: list, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `diffedit` entry point in a child process (for pipes, exit codes, environment)."""
    cmd = [sys.executable, "-c", "from diffedit.cli.main import main; main()", *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=300, env={**os.environ, **(env or {})})


def toy_round_trips(model, steps: int, scenes: int = 3, **params) -> tuple[list[float], set[int]]:
    """The `ddim` engine's invert-then-sample on toy scenes with their captions (CFG 1) and `params`:
    each scene's latent RMS error, and the network calls its inversion made."""
    import torch

    from diffedit.denoiser import branch_denoiser
    from diffedit.engines import Run
    from diffedit.inversion import get_engine
    from diffedit.toy.shapes import make_scene

    engine, side, errors, calls = get_engine("ddim"), 64, [], set()
    for seed in range(scenes):
        scene = make_scene(10**8 + seed)
        z0 = model.encode_image(torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1)
        denoise = branch_denoiser(model, scene.caption, 1.0, side, side)
        resolved = engine.resolve(engine.Params(**params), steps, model)
        run = Run(model, engine.schedule(model, steps, side, side, resolved), denoise, denoise, resolved)
        tensors = engine.invert(run, z0)
        calls.add(denoise.calls)
        errors.append(float((engine.edit(run, tensors) - z0).pow(2).mean().sqrt()))
    return errors, calls
