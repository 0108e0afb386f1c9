"""`diffedit generate`."""

from __future__ import annotations

from typing import Annotated

import typer

from diffedit.cli.common import (
    BATCHED,
    AdaptiveGuidanceOpt,
    DeepCacheOpt,
    FKEveryOpt,
    FKLambdaOpt,
    FKParticlesOpt,
    FKPotentialOpt,
    GuidanceOpt,
    ModelChoice,
    OverwriteOpt,
    PagAdaptiveOpt,
    PagLayersOpt,
    PagScaleOpt,
    QuietOpt,
    ReportChoice,
    RewardOpt,
    SeedOpt,
    SolverOpt,
    StepsOpt,
    check_job_outputs,
    finite_scale,
    fk_config,
    generated_name,
    guidance_spec,
    progress,
    warn_prompts,
    with_model_options,
    with_report_options,
)
from diffedit.cli.main import app

MAX_SIDE = 16384  # pixels; and at most MAX_PIXELS in all, as for input images
MAX_PIXELS = 64_000_000


@app.command()
@with_model_options
@with_report_options
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Image file, or - for stdout (default: PROMPT-SLUG-SEED.png here).")] = None,
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g", callback=finite_scale, help="CFG scale (embedded guidance for Flux); default 7.5, CFG++'s lambda 0.6.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    eta: Annotated[float, typer.Option("--eta", help="Churn: 0 = deterministic DDIM/Euler, 1 = DDPM-like.")] = 0.0,
    solver: SolverOpt = None,
    fk_particles: FKParticlesOpt = 1, fk_lambda: FKLambdaOpt = 10.0, fk_potential: FKPotentialOpt = "max",
    fk_every: FKEveryOpt = 5, reward: RewardOpt = "saturation",
    width: Annotated[int | None, typer.Option("--width", "-W", min=8, max=MAX_SIDE, help="Width in pixels, any (sampled on the model's next multiple, cropped back); default: the model's.")] = None,
    height: Annotated[int | None, typer.Option("--height", "-H", min=8, max=MAX_SIDE, help="Height in pixels, as --width.")] = None,
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0, adaptive_guidance: AdaptiveGuidanceOpt = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network (a slow first call; pays off over many steps or batch jobs).")] = False,
    deepcache: DeepCacheOpt = None,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    *, models: ModelChoice, report: ReportChoice,
):
    """Draw an image from a prompt (DDIM / Euler with classifier-free guidance).

    Example: diffedit generate "a red circle on a white background" --seed 1 -o circle.png
    """
    job = dict(ctx.params)  # the parsed options, as a batch hands a job over
    if output is None:  # named after the prompt and the seed, so the seed is drawn here
        import secrets

        job["seed"] = secrets.randbelow(2**31) if seed is None else seed
        job["output"] = generated_name(prompt, job["seed"])
    generate_many([job])


def generate_many(jobs: list[dict]) -> list[dict]:
    """Run generate jobs (the command's parameters each) that differ only in VARYING as one batch.

    Every branch of every image runs in one forward per step (`diffedit batch --batch-size`).
    """
    from diffedit.errors import UsageError

    first = jobs[0]
    if (first["width"] or 0) * (first["height"] or 0) > MAX_PIXELS:
        raise UsageError(f"-W {first['width']} -H {first['height']} is more than {MAX_PIXELS} pixels")
    for job in jobs:  # before the heavy imports: a usage error is answered at once
        check_job_outputs(job)
    from diffedit.images import save_image
    from diffedit.jobs import generate_image, generate_images, image_params

    spec = guidance_spec(first["guidance"], first["pag_scale"], first["pag_layers"], first["pag_adaptive_scale"],
                         first["adaptive_guidance"])
    fk = fk_config(first["fk_particles"], first["fk_lambda"], first["fk_potential"], first["fk_every"], first["eta"])
    if first["compile"] and (first["deepcache"] or "pag" in spec.kind):
        raise UsageError("--compile cannot be combined with --deepcache or PAG: both change the network's "
                         "modules between steps")
    if first["compile"] and first["adapter"]:
        raise UsageError("--compile cannot be combined with --adapter: SPM adapters hook into the network's layers")
    m = ModelChoice.of(first).load(compile=first["compile"], quiet=first["quiet"])
    warn_prompts(m, [job["prompt"] for job in jobs] + [first["negative_prompt"]], first["quiet"])
    steps = first["steps"] or 50
    scale = spec.default_scale(7.5) if first["guidance_scale"] is None else first["guidance_scale"]
    common = dict(steps=steps, guidance_scale=scale, negative_prompt=first["negative_prompt"],
                  width=first["width"], height=first["height"], guidance=spec, eta=first["eta"],
                  deepcache=first["deepcache"], solver=first["solver"] or "ddim")
    with progress(steps, "generate", first["quiet"]) as callback:
        if fk is not None:  # the particles are the batch
            assert len(jobs) == 1, "FK steering is not micro-batched"
            outs = [generate_image(m, first["prompt"], seed=first["seed"], reward=first["reward"], fk=fk,
                                   callback=callback, **common)]
        else:
            outs = generate_images(m, [j["prompt"] for j in jobs], [j["seed"] for j in jobs], callback=callback,
                                   **common)
    results = []
    for job, (image, result) in zip(jobs, outs):
        params = image_params("generate", m, prompt=job["prompt"], negative_prompt=job["negative_prompt"],
                              seed=result["seed"], steps=steps, guidance_scale=scale,
                              guidance=spec.to_dict(), eta=job["eta"], solver=first["solver"] or "ddim",
                              fk_particles=job["fk_particles"],
                              reward=job["reward"] if job["fk_particles"] > 1 else None,
                              size=result["size"])
        save_image(image, job["output"], params=params, overwrite=job["overwrite"])
        ReportChoice.of(job).emit({"output": job["output"], **result}, job["output"], job["quiet"], job["overwrite"])
        results.append({"output": job["output"], **result})
    return results


# Parameters a micro-batch may vary; jobs equal in everything else share one batch.
VARYING = ("prompt", "seed", "output")
BATCHED["generate"] = (generate_many, VARYING, lambda job: job["fk_particles"] <= 1)
