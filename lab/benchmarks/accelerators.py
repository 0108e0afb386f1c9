"""Accelerators (adaptive guidance, DeepCache, torch.compile) against plain CFG on the toy model: speed and what
they cost in prompt following.

For each of N seeded single-object prompts ("a red circle on a white background", ...), one image with
plain CFG and one with each accelerator setting, same seed, steps and scale. Reported side by side:
the checker's success (shape and colour right), network evaluations per image (a CFG step is two),
seconds per image and the speed-up against CFG in the same run, and how far the accelerated image is
from the CFG one (PSNR).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from diffedit.guidance import GuidanceSpec
from diffedit.images import psnr
from diffedit.jobs import generate_image
from lab.toy.quality import judge, prompt_set


def run(model, n: int = 50, steps: int = 50, guidance_scale: float = 5.0,
        thresholds: tuple[float, ...] = (0.99, 0.995, 0.999), intervals: tuple[int, ...] = (2, 3, 5)) -> list[dict]:
    prompts = prompt_set(n)
    settings = ([("cfg", {})] + [(f"adaptive guidance {t}", {"guidance": GuidanceSpec(adaptive_threshold=t)})
                                 for t in thresholds]
                + [(f"deepcache {k}", {"deepcache": k}) for k in intervals] + [("torch.compile", {})])
    started = time.perf_counter()  # the one-time compilation, paid before the measured runs
    model.compile()
    generate_image(model, prompts[0][0], seed=0, steps=2, guidance_scale=guidance_scale)
    compile_seconds = time.perf_counter() - started
    stats = {name: {"ok": 0, "evals": [], "seconds": [], "psnr": []} for name, _ in settings}
    for seed, (prompt, shape, colour) in enumerate(prompts):
        reference = None
        for name, accelerator in settings:  # interleaved, so drifts in machine speed hit every setting
            model.use_compiled = name == "torch.compile"
            image, result = generate_image(model, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                           **accelerator)
            pixels = np.asarray(image)
            s, c = judge(pixels, shape, colour)
            row = stats[name]
            row["ok"] += s and c
            row["evals"].append(sum(rows * calls for rows, calls in result["forwards"].items()))
            row["seconds"].append(result["seconds"])
            if reference is None:
                reference = image
            else:
                row["psnr"].append(psnr(image, np.asarray(reference)))
    base = statistics.mean(stats["cfg"]["seconds"])
    out = []
    for name, _ in settings:
        row = stats[name]
        seconds = statistics.mean(row["seconds"])
        finite = [p for p in row["psnr"] if np.isfinite(p)]
        out.append({"setting": name, "images": n, "steps": steps, "success_pct": 100 * row["ok"] / n,
                    "evals_per_image": round(statistics.mean(row["evals"]), 1), "seconds": round(seconds, 3),
                    "speedup": round(base / seconds, 2),
                    "psnr_vs_cfg": round(statistics.mean(finite), 2) if finite else None,
                    "identical_pct": 100 * (len(row["psnr"]) - len(finite)) / n if row["psnr"] else None})
    model.use_compiled = False
    out[-1]["compile_s"] = round(compile_seconds, 1)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | images | success % | network evals / image (batch rows) | s / image | speed-up | PSNR vs CFG (dB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['images']} | {r['success_pct']:.0f} | {r['evals_per_image']} | "
                     f"{r['seconds']} | {r['speedup']} | {r['psnr_vs_cfg'] if r['psnr_vs_cfg'] is not None else '—'} |")
    compiled = [r for r in rows if "compile_s" in r]
    if compiled:
        lines.append(f"\n(torch.compile: {compiled[0]['compile_s']} s of one-time compilation, not in the table.)")
    return "\n".join(lines)
