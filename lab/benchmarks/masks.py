"""Cost of an edit mask: the same edit with and without `--mask`, side by side in one run.

A masked edit makes the same network calls as an unmasked one (the source outside the mask is
something every engine already holds); what it adds is one blend per step, the mask's own
preparation and the paste-back. Each engine edits a mid-size SD1-shaped model's image (the toy
flow model's for the flow engines) both ways, interleaved, medians of `repeats`.
"""

from __future__ import annotations

import statistics

import numpy as np
from PIL import Image

from diffedit.families import adapter_for
from diffedit.jobs import MaskInput, edit_image
from diffedit.plan import plan_job
from lab.benchmarks.overhead import _timed, mid_size_sd1
from lab.testing import tiny_pipeline

UNET_ENGINES = ("ddim", "ddpm-ef", "bdia", "direct", "ddim-p2p", "infedit")
FLOW_ENGINES = ("rf-inversion", "flowedit")
SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


def _inputs(size: int) -> tuple[Image.Image, Image.Image]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = 255
    return image, Image.fromarray(mask)


def measure(model, engine: str, size: int, steps: int, repeats: int) -> dict:
    image, mask = _inputs(size)
    plan = plan_job(model, engine=engine, steps=steps)
    plain = lambda: edit_image(model, image, plan, source_prompt=SOURCE, target_prompt=TARGET)  # noqa: E731
    masked = lambda: edit_image(model, image, plan, source_prompt=SOURCE, target_prompt=TARGET,  # noqa: E731
                                mask=MaskInput(mask))
    plain(), masked()  # warm-up
    times = {"plain": [], "masked": []}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        times["plain"].append(_timed(plain))
        times["masked"].append(_timed(masked))
    plain_s, masked_s = statistics.median(times["plain"]), statistics.median(times["masked"])
    return {"engine": engine, "model": model.name, "size": size, "steps": plan.steps, "plain_s": round(plain_s, 4),
            "masked_s": round(masked_s, 4), "masked_over_plain": round(masked_s / plain_s, 3)}


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    steps = 10 if quick else 20
    unet = adapter_for(tiny_pipeline("sd1") if quick else mid_size_sd1(), "sd1")
    flow = adapter_for(tiny_pipeline("sd3"), "sd3", 16)
    rows = [measure(unet, engine, 32 if quick else 128, steps, repeats) for engine in UNET_ENGINES]
    rows += [measure(flow, engine, 32 if quick else 64, steps, repeats) for engine in FLOW_ENGINES]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | model | size | steps | unmasked s | masked s | masked ÷ unmasked |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['model']} | {r['size']}² | {r['steps']} | {r['plain_s']} | {r['masked_s']} | "
              f"{r['masked_over_plain']} |" for r in rows]
    return "\n".join(lines)
