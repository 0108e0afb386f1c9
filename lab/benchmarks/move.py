"""Cost of `diffedit move` (PixelMan) vs the network passes it makes, measured side by side.

The passes alone: the VAE encode of the source and manipulated images, the batched sampling forwards
([source, anchor, target] per step, diffusers' own attention processors), the energies' feature
passes without gradient and with a forward and two backwards (the edit and the other energies are
masked differently, so the official code takes two gradients), and the VAE decode. Everything else PixelMan
does (attention control, masks, energies, the anchored update) is the overhead the ratio shows.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from diffedit.editing.pixelman import EnergyWeights, FeatureEnergy, MoveSpec, plan_move
from diffedit.families import adapter_for
from diffedit.images import to_tensor
from diffedit.jobs import move_image


def scene(size: int) -> tuple[Image.Image, Image.Image]:
    """A grey image with a red square in its upper left quarter, and the square's mask."""
    a = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    lo, hi = size // 8, size // 8 + size // 4
    a[lo:hi, lo:hi] = (220, 30, 30)
    mask[lo:hi, lo:hi] = 255
    return Image.fromarray(a), Image.fromarray(mask)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, model, size: int, repeats: int, steps: int = 16) -> dict:
    img, mask = scene(size)
    move = MoveSpec(size / 2, size / 4)
    weights = EnergyWeights()

    def ours():
        return move_image(model, img, mask, move, steps=steps, energy=weights)[1]

    result = ours()  # warm-up, and the passes a move makes
    (batch, forwards), = result["forwards"].items()
    selected = torch.from_numpy(np.asarray(mask) > 127)
    masks, centre, move_px = plan_move(selected, move)
    pixels = torch.cat([to_tensor(img)] * 2)
    z0 = model.encode_image(pixels[:1])
    cond, _ = model.encode_prompts([""] * batch, None, size, size)
    one, _ = model.encode_prompts([""], None, size, size)
    energy = FeatureEnergy(model, one, [(masks, centre, move_px)], weights, tuple(z0.shape[-2:]))
    x = torch.randn(batch, *z0.shape[1:])
    t = model.schedule(steps, size, size).times[steps // 2]
    gradients = result["backward_passes"] // 2
    no_grad = result["energy_passes"] - gradients

    def passes():
        model.encode_image(pixels)
        with torch.inference_mode():
            for _ in range(forwards):
                model.forward(x.to(model.dtype), t, cond)
        with torch.no_grad():
            for _ in range(no_grad):
                energy.features(z0, t)
        for _ in range(gradients):  # a forward and two backwards each
            z = z0.clone().requires_grad_(True)
            total = sum(f.sum() for f in energy.features(z, t))
            torch.autograd.grad(total, z, retain_graph=True)
            torch.autograd.grad(total, z)
        model.decode(z0)

    passes()
    ours_t, pass_t = [], []
    for _ in range(repeats):  # interleaved so drifts in machine load hit both alike
        ours_t.append(_timed(ours))
        pass_t.append(_timed(passes))
    ours_s, pass_s = statistics.median(ours_t), statistics.median(pass_t)
    return {"model": name, "size": size, "steps": steps, "forwards": f"{forwards} x batch {batch}",
            "energy_passes": result["energy_passes"], "backward_passes": result["backward_passes"],
            "nfe": result["nfe"], "ours_s": round(ours_s, 4), "passes_s": round(pass_s, 4),
            "ours_over_passes": round(ours_s / pass_s, 3)}


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    from diffedit.models import DEFAULT_MODEL, load_model
    from lab.benchmarks.overhead import mid_size_sd1

    rows = [measure("toy-sd", load_model(DEFAULT_MODEL, device="cpu"), 64, repeats)]
    if not quick:
        torch.manual_seed(0)
        rows.append(measure("mid-sd1", adapter_for(mid_size_sd1(), "sd1"), 256, repeats))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | size | steps | sampling forwards | feature forwards | feature backwards | NFE | move (s) "
             "| passes alone (s) | move ÷ passes |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']}² | {r['steps']} | {r['forwards']} | {r['energy_passes']} | "
                     f"{r['backward_passes']} | {r['nfe']} | {r['ours_s']} | {r['passes_s']} | "
                     f"{r['ours_over_passes']} |")
    return "\n".join(lines)
