"""Few-step sampling: latent-consistency models against their teacher, what `diffedit bench lcm` measures.

For each step count, N seeded single-object prompts drawn by each consistency model (consistency
steps; an LCM takes the guidance scale as its input, an LCM-LoRA has its guidance distilled in and
runs without CFG, scale 1) and by the teacher (DDIM with CFG at the scale, so two rows per forward),
same seeds; the checker scores the asked shape and colour. Seconds are per image, the models
measured one after the other in the same process.
"""

from __future__ import annotations

import time

from lab.toy.quality import prompt_following


def run(students: list[tuple[str, object]], teacher, n: int = 100, steps: tuple[int, ...] = (1, 2, 4, 8),
        guidance_scale: float = 5.0, teacher_steps: int = 50, log=print) -> list[dict]:
    """`students`: (label, consistency model) pairs."""
    rows = []
    plan = [(label, model, k, guidance_scale if model.guidance_embedded else 1.0)
            for label, model in students for k in steps]
    plan += [("teacher (DDIM + CFG)", teacher, k, guidance_scale) for k in (*steps, teacher_steps)]
    for name, model, k, scale in plan:
        started = time.perf_counter()
        scores = prompt_following(model, n, k, scale, seed=3)
        seconds = (time.perf_counter() - started) / n
        row = {"model": name, "steps": k, "prompts": n, **{key: round(v, 1) for key, v in scores.items()},
               "network_rows_per_image": k * (1 if model.guidance_embedded or scale == 1 else 2),
               "seconds_per_image": round(seconds, 4)}
        log(str(row))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | steps | shape % | colour % | both % | network rows / image | s / image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['shape_pct']} | {r['colour_pct']} | {r['both_pct']} | "
                     f"{r['network_rows_per_image']} | {r['seconds_per_image']} |")
    return "\n".join(lines)
