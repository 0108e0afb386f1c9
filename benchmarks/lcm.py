"""Few-step sampling: a latent-consistency model against its teacher, what `diffedit bench lcm` measures.

For each step count, N seeded single-object prompts drawn by the LCM (consistency steps, guidance
scale as its input) and by the teacher (DDIM with CFG at the same scale, so two rows per forward),
same seeds; the checker scores the asked shape and colour. Seconds are per image, the models
measured one after the other in the same process.
"""

from __future__ import annotations

import time

from diffedit.toy.quality import generate_batch, judge, prompt_set


def _score(model, prompts, steps: int, guidance_scale: float, batch: int = 50) -> tuple[dict, float]:
    shape = colour = both = 0
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        images = generate_batch(model, [p for p, _, _ in chunk], list(range(start, start + len(chunk))), steps,
                                guidance_scale)
        for image, (_, s, c) in zip(images, chunk):
            ok_s, ok_c = judge(image, s, c)
            shape, colour, both = shape + ok_s, colour + ok_c, both + (ok_s and ok_c)
    n = len(prompts)
    scores = {"shape_pct": 100 * shape / n, "colour_pct": 100 * colour / n, "both_pct": 100 * both / n}
    return scores, (time.perf_counter() - started) / n


def run(lcm, teacher, n: int = 100, steps: tuple[int, ...] = (1, 2, 4, 8), guidance_scale: float = 5.0,
        teacher_steps: int = 50, log=print) -> list[dict]:
    prompts = prompt_set(n, seed=3)
    rows = []
    plan = [("lcm", lcm, k) for k in steps] + [("teacher (DDIM + CFG)", teacher, k) for k in steps]
    plan.append(("teacher (DDIM + CFG)", teacher, teacher_steps))
    for name, model, k in plan:
        scores, seconds = _score(model, prompts, k, guidance_scale)
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
