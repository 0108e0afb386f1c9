"""Guidance cost per step relative to plain CFG, and ours vs diffusers' PAG pipeline; one run,
interleaved, medians. Expected: CFG++ ~1x (same two branches), PAG ~1.5x (a third branch in the
same batch), FK with K particles ~Kx (K images per forward, plus reward evaluations)."""

from __future__ import annotations

import statistics

import torch

from diffedit.families import adapter_for
from diffedit.guidance import GuidanceSpec
from diffedit.guidance.fk import FKConfig
from diffedit.jobs import generate_image
from lab.benchmarks.overhead import PROMPT, _timed, mid_size_sd1
from lab.testing import tiny_pipeline


def run(repeats: int = 3, quick: bool = False, particles: int = 4) -> list[dict]:
    pipe = tiny_pipeline("sd1") if quick else mid_size_sd1()
    pipe.set_progress_bar_config(disable=True)
    model = adapter_for(pipe, "sd1")
    size, steps = (32, 10) if quick else (256, 20)
    from diffusers import StableDiffusionPAGPipeline

    parts = {k: v for k, v in pipe.components.items() if k in StableDiffusionPAGPipeline.__init__.__code__.co_varnames}
    pag_pipe = StableDiffusionPAGPipeline(**parts, pag_applied_layers="mid")
    pag_pipe.set_progress_bar_config(disable=True)

    def job(kind, scale, fk=None):
        return lambda: generate_image(model, PROMPT, seed=0, steps=steps, guidance_scale=scale, width=size,
                                      height=size, guidance=GuidanceSpec(kind), fk=fk)

    jobs = {
        "cfg": job("cfg", 7.5),
        "cfgpp": job("cfgpp", 0.6),
        "pag": job("pag", 7.5),
        f"fk (K={particles})": job("cfg", 7.5, FKConfig(particles=particles, every=5)),
        "diffusers PAG pipeline": lambda: pag_pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5,
                                                   pag_scale=3.0, height=size, width=size, output_type="pil",
                                                   generator=torch.Generator().manual_seed(0)),
    }
    for fn in jobs.values():
        fn()  # warm-up
    times = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            times[name].append(_timed(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"guidance": name, "size": size, "steps": steps, "seconds": round(med[name], 3),
             "per_step_vs_cfg": round(med[name] / med["cfg"], 3)} for name in jobs]
    rows.append({"guidance": "ours pag ÷ diffusers PAG", "size": size, "steps": steps,
                 "seconds": None, "per_step_vs_cfg": round(med["pag"] / med["diffusers PAG pipeline"], 3)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| guidance | size | steps | seconds | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']} | {r['size']}² | {r['steps']} | {r['seconds'] if r['seconds'] is not None else ''} "
                     f"| {r['per_step_vs_cfg']} |")
    return "\n".join(lines)
