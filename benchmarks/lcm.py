"""Few-step sampling: a latent-consistency model against its teacher, what `diffedit bench lcm` measures.

For each step count, N seeded single-object prompts drawn by the LCM (consistency steps, guidance
scale as its input) and by the teacher (DDIM with CFG at the same scale, so two rows per forward),
same seeds; the checker scores the asked shape and colour. Seconds are per image, the models
measured one after the other in the same process.
"""

from __future__ import annotations

import time

from diffedit.toy.quality import prompt_following


def run(lcm, teacher, n: int = 100, steps: tuple[int, ...] = (1, 2, 4, 8), guidance_scale: float = 5.0,
        teacher_steps: int = 50, log=print) -> list[dict]:
    rows = []
    plan = [("lcm", lcm, k) for k in steps] + [("teacher (DDIM + CFG)", teacher, k) for k in steps]
    plan.append(("teacher (DDIM + CFG)", teacher, teacher_steps))
    for name, model, k in plan:
        started = time.perf_counter()
        scores = prompt_following(model, n, k, guidance_scale, seed=3)
        seconds = (time.perf_counter() - started) / n
        row = {"model": name, "steps": k, "prompts": n, **{key: round(v, 1) for key, v in scores.items()},
               "network_rows_per_image": k * (1 if model.guidance_embedded else 2),
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
