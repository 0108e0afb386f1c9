"""`diffedit move`: move, resize or duplicate an object (PixelMan)."""

from __future__ import annotations

from typing import Annotated

import typer

from diffedit.cli.common import (
    BATCHED,
    SEED_MAX,
    AlphaOpt,
    FitOpt,
    GuidanceOpt,
    ModelChoice,
    OverwriteOpt,
    PagAdaptiveOpt,
    PagLayersOpt,
    PagScaleOpt,
    QuietOpt,
    ReportChoice,
    check_job_outputs,
    default_output,
    finite_scale,
    guidance_spec,
    inputs_exist,
    progress,
    warn_prompts,
    with_model_options,
    with_report_options,
)
from diffedit.cli.main import app


@app.command()
@with_model_options
@with_report_options
def move(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Image file, or - for stdin.")],
    mask: Annotated[str | None, typer.Option("--mask", help="The object: a PNG of the image's size, white (or opaque) where the object is.")] = None,
    mask_from_prompt: Annotated[str | None, typer.Option("--mask-from-prompt", help="Instead of --mask: find the object where WORD(S) of --prompt attend (cross-attention).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Image file, or - for stdout (default: IMAGE.move.png beside the input).")] = None,
    dx: Annotated[float | None, typer.Option("--dx", help="Move right by this many pixels (negative: left).")] = None,
    dy: Annotated[float | None, typer.Option("--dy", help="Move down by this many pixels (negative: up).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="X,Y: put the object's box centre here instead of --dx/--dy.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Resize the object by this factor about its box centre.")] = 1.0,
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Duplicate: leave the object where it was too.")] = False,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Optional prompt (the paper uses none).")] = "",
    steps: Annotated[int, typer.Option("--steps", "-n", min=2, max=1000, help="Sampling steps (the paper's 16).")] = 16,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g", callback=finite_scale, help="CFG scale (default: 1 without a prompt, 4 with one).")] = None,
    energy_scale: Annotated[float | None, typer.Option("--energy-scale", help="Energy guidance strength (default: the model folder's recommendation, else the paper's 0.5; 0 = off).")] = None,
    energy_weights: Annotated[str, typer.Option("--energy-weights", help="EDIT,CONTENT,CONTRAST,INPAINT energy weights.")] = "4,6,0.2,0.8",
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the per-step noise.")] = 0,
    fit: FitOpt = "pad",
    alpha: AlphaOpt = "composite",
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    *, models: ModelChoice, report: ReportChoice,
):
    """Move the masked object by (--dx, --dy) or --to X,Y; inversion-free, 16 steps (PixelMan).

    Example: diffedit move photo.png --mask cup.png --dx 40 --dy -10 -o moved.png
    """
    inputs_exist(image, mask)
    job = dict(ctx.params)  # the parsed options, as a batch hands a job over
    job["output"] = output or default_output(image, "move")
    move_many([job])


def move_many(jobs: list[dict]) -> list[dict]:
    """Run move jobs (the command's parameters each) that differ only in MOVE_VARYING as one batch:
    every move's branches share each forward (`diffedit batch --batch-size`)."""
    from diffedit.editing.pixelman import MoveSpec
    from diffedit.errors import UsageError
    from diffedit.images import made_from, save_image
    from diffedit.jobs import ImageInput, MoveInput, image_params, move_images
    from diffedit.plan import move_energy_scale

    first = jobs[0]
    for job in jobs:  # before the model loads: a usage error is answered at once
        ReportChoice.of(job).check(job["output"], job["overwrite"])
        if (job["to"] is None) == (job["dx"] is None and job["dy"] is None):
            raise UsageError("give either --dx/--dy or --to X,Y")
        if (job["mask"] is None) == (job["mask_from_prompt"] is None):
            raise UsageError("give either --mask FILE or --mask-from-prompt WORD")
        check_job_outputs(job)
    energy_scale = first["energy_scale"]
    _weights(first["energy_weights"], energy_scale or 0.0)
    spec = guidance_spec(first["guidance"], first["pag_scale"], first["pag_layers"], first["pag_adaptive_scale"])
    moves = [MoveInput(job["image"], job["mask"], MoveSpec(job["dx"] or 0.0, job["dy"] or 0.0, job["scale"],
                                                          job["keep_source"], None if job["to"] is None else _point(job["to"])),
                       job["seed"], job["mask_from_prompt"]) for job in jobs]
    m = ModelChoice.of(first).load(quiet=first["quiet"])
    warn_prompts(m, [first["prompt"]], first["quiet"])
    energy_scale, defaults = move_energy_scale(m, energy_scale)
    with progress(first["steps"], "move (pixelman)", first["quiet"]) as callback:
        outs = move_images(m, moves, prompt=first["prompt"], steps=first["steps"],
                           guidance_scale=first["guidance_scale"], negative_prompt=first["negative_prompt"],
                           energy=_weights(first["energy_weights"], energy_scale),
                           image=ImageInput(fit=first["fit"], alpha=first["alpha"]), guidance=spec, callback=callback)
    results = []
    for job, (out, result) in zip(jobs, outs):
        meta = image_params("move", m, image=job["image"], made_from=made_from(job["image"]), mask=job["mask"],
                            mask_from_prompt=job["mask_from_prompt"], dx=job["dx"], dy=job["dy"], to=job["to"],
                            scale=job["scale"], keep_source=job["keep_source"], prompt=job["prompt"], steps=job["steps"],
                            guidance_scale=result["guidance_scale"], seed=job["seed"], energy_scale=energy_scale,
                            energy_weights=job["energy_weights"], guidance=spec.to_dict(), defaults=defaults)
        save_image(out, job["output"], params=meta, overwrite=job["overwrite"])
        report = {"output": job["output"], **result, "energy_scale": energy_scale, "defaults": defaults}
        ReportChoice.of(job).emit(report, job["output"], job["quiet"], job["overwrite"])
        results.append(report)
    return results


# Parameters a micro-batch of moves may vary; jobs equal in everything else (the prompt too) share one batch.
MOVE_VARYING = ("image", "mask", "mask_from_prompt", "dx", "dy", "to", "seed", "output", "json_out")
BATCHED["move"] = (move_many, MOVE_VARYING, lambda job: "-" not in (job["image"], job["output"]))


def _point(text: str) -> tuple[float, float]:
    from diffedit.errors import UsageError

    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--to {text!r}: expected X,Y in pixels, e.g. 40,32") from None
    return x, y


def _weights(text: str, scale: float):
    from diffedit.editing.pixelman import EnergyWeights
    from diffedit.errors import UsageError

    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 4:
        raise UsageError(f"--energy-weights {text!r}: expected four numbers EDIT,CONTENT,CONTRAST,INPAINT")
    return EnergyWeights.at_scale(scale, weights)
