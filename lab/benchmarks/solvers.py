"""Round trips against network evaluations: first- and second-order solvers on the toy models.

Each solver inverts the source scenes of ShapesBench's reconstruction tasks with their captions and
samples them back with the same prompt, without guidance (CFG 1), at 5, 10, 20 and 50 steps. The
table gives the mean PSNR of the result against the input and the VAE's own round trip (the ceiling
any inversion can reach), with the network evaluations of each direction: DDIM, Euler and
DPM-Solver++ (2M) make one per step, RF-Solver two, FireFlow one plus one; a fixed-point inversion
(`--fixed-point K`) K + 1 per step while its sampling stays at one. The plot draws PSNR against the
evaluations of the whole round trip.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from PIL import Image

from diffedit.jobs import invert_image
from diffedit.models import load_model
from diffedit.plan import plan_job
from lab.toy.bench import load_tasks, source_scene

# (model folder, solver label, engine, engine options)
SOLVERS = (
    ("samples/toy-sd", "DDIM", "ddim", {}),
    ("samples/toy-sd", "DDIM, fixed point 2", "ddim", {"fixed_point": 2}),
    ("samples/toy-sd", "DPM-Solver++ 2M", "ddim", {"solver": "dpmpp-2m"}),
    ("samples/toy-flow", "Euler", "ddim", {}),
    ("samples/toy-flow", "Euler, fixed point 2", "ddim", {"fixed_point": 2}),
    ("samples/toy-flow", "RF-Solver", "rf-solver", {}),
    ("samples/toy-flow", "FireFlow", "fireflow", {}),
)
STEPS = (5, 10, 20, 50)


def run(scenes: int = 10, quick: bool = False) -> list[dict]:
    tasks = [t for t in load_tasks() if t["kind"] == "reconstruct"][: 2 if quick else scenes]
    images = [(Image.fromarray(source_scene(t).image), t["source_prompt"]) for t in tasks]
    models, rows = {}, []
    for folder, label, engine, params in SOLVERS:
        model = models.setdefault(folder, load_model(folder))
        for steps in (5, 10) if quick else STEPS:
            plan = plan_job(model, engine=engine, steps=steps, params=params, inversion_guidance_scale=1.0)
            results = [invert_image(model, image, plan, prompt=prompt)[1] for image, prompt in images]
            psnr = statistics.mean(r["psnr"] for r in results)
            ceiling = statistics.mean(r["vae_psnr"] for r in results)
            inverting = results[0]["inversion_nfe"]
            rows.append({"model": Path(folder).name, "solver": label, "engine": engine, "steps": steps,
                         "nfe_invert": inverting, "nfe_sample": results[0]["nfe"] - inverting,
                         "scenes": len(results), "psnr": round(psnr, 2),
                         "vae_psnr": round(ceiling, 2), "gap_db": round(ceiling - psnr, 2)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | solver | steps | NFE invert | NFE sample | round-trip PSNR (dB) | VAE ceiling (dB) | gap (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['solver']} | {r['steps']} | {r['nfe_invert']} | {r['nfe_sample']} | {r['psnr']} | "
              f"{r['vae_psnr']} | {r['gap_db']} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """PSNR against NFE, one line per solver, each model's VAE ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for solver in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == solver]
        ax.plot([r["nfe_invert"] + r["nfe_sample"] for r in mine], [r["psnr"] for r in mine], marker="o",
                linestyle="-" if mine[0]["model"] == "toy-flow" else "--", label=f"{solver} ({mine[0]['model']})")
    ceilings: dict[float, list[str]] = {}  # models that share a VAE share a ceiling: one line for them
    for model in dict.fromkeys(r["model"] for r in rows):
        ceiling = round(statistics.mean(r["vae_psnr"] for r in rows if r["model"] == model), 2)
        ceilings.setdefault(ceiling, []).append(model)
    for ceiling, models in ceilings.items():
        ax.axhline(ceiling, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(f"VAE ceiling ({', '.join(models)})", (0.99, ceiling), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations of the round trip (inversion + sampling)")
    ax.set_ylabel("round-trip PSNR (dB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version string: the file changes only with the data
    plt.close(fig)
