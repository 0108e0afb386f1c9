"""One speed table for every command x engine (`diffedit bench speed`).

Each row comes from the benchmark that measures it side by side in one run (see overhead, engines,
guidance and move): seconds, NFE, seconds ÷ the network passes the job makes, and ours ÷ diffusers'
pipeline for the same job where diffusers has one. All rows use the same mid-size SD1-shaped UNet
(random weights) at 256², 20 steps (PixelMan: its 16); `--quick` uses the tiny SD1 at 32².
"""

from __future__ import annotations

import torch

from diffedit.families import adapter_for
from lab.benchmarks import engines, guidance, move, overhead
from lab.testing import tiny_pipeline


def run(repeats: int = 3, quick: bool = False) -> list[dict]:
    size, steps = (32, 10) if quick else (256, 20)
    make = (lambda: tiny_pipeline("sd1")) if quick else overhead.mid_size_sd1
    rows = []
    gen = overhead.measure("sd1", make(), size, steps, repeats)
    rows.append(_row("generate", "ddim, CFG 7.5", gen["ours_s"], gen["nfe"], gen["ours_over_nfe_forward"],
                     gen["ours_over_diffusers"], "StableDiffusionPipeline"))
    by_guidance = {r["guidance"]: r for r in guidance.run(repeats=repeats, quick=quick)}
    pag_vs = by_guidance["ours pag ÷ diffusers PAG"]["per_step_vs_cfg"]
    for name, vs in (("cfgpp", None), ("pag", pag_vs)):
        r = by_guidance[name]
        rows.append(_row("generate", f"ddim, {name}", r["seconds"], steps, None, vs,
                         "StableDiffusionPAGPipeline" if vs else None))
    per_engine, comparison = engines.run(repeats=repeats, quick=quick)
    ledits = comparison[0]["ours_over_ledits_pp"]
    for r in per_engine:
        if r["invert_nfe"]:
            rows.append(_row("invert", r["engine"], r["invert_s"], r["invert_nfe"], r["invert_over_forwards"]))
        vs = ledits if r["engine"] == "ddpm-ef" else None
        rows.append(_row("edit", r["engine"], r["edit_s"], r["edit_nfe"], r["edit_over_forwards"], vs,
                         "LEDITS++ (invert + regenerate)" if vs else None))
    torch.manual_seed(0)
    moved = move.measure("sd1", adapter_for(make(), "sd1"), size, repeats)
    rows.append(_row("move", "pixelman", moved["ours_s"], moved["nfe"], moved["ours_over_passes"]))
    return [{**r, "size": size} for r in rows]


def _row(command, engine, seconds, nfe, over_passes, over_diffusers=None, reference=None) -> dict:
    return {"command": command, "engine": engine, "seconds": seconds, "nfe": nfe, "over_passes": over_passes,
            "over_diffusers": over_diffusers, "diffusers_reference": reference}


def markdown(rows: list[dict]) -> str:
    dash = lambda v: "—" if v is None else v  # noqa: E731
    lines = ["| command | engine / guidance | size | seconds | NFE | seconds ÷ its network passes | ours ÷ diffusers "
             "| diffusers reference |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['command']} | {r['engine']} | {r['size']}² | {r['seconds']} | {r['nfe']} | "
                     f"{dash(r['over_passes'])} | {dash(r['over_diffusers'])} | {dash(r['diffusers_reference'])} |")
    return "\n".join(lines)
