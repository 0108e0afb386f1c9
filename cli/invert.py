"""`diffedit invert` and `diffedit reconstruct`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    BATCHED,
    SEED_MAX,
    AlphaOpt,
    EngineOpt,
    EtaOpt,
    FitOpt,
    FixedPointOpt,
    GammaOpt,
    GuidanceOpt,
    MaskChoice,
    ModelChoice,
    NAvgOpt,
    NMaxOpt,
    NMinOpt,
    OverwriteOpt,
    PagAdaptiveOpt,
    PagLayersOpt,
    PagScaleOpt,
    QuietOpt,
    ReportChoice,
    ShareFromOpt,
    ShareStepsOpt,
    SkipOpt,
    SolverOpt,
    StartOpt,
    StepsOpt,
    StopOpt,
    StrengthOpt,
    check_job_outputs,
    default_output,
    engine_params,
    finite_scale,
    guidance_spec,
    inputs_exist,
    progress,
    warn_prompts,
    with_mask_options,
    with_model_options,
    with_report_options,
)
from diffedit.cli.main import app


@app.command()
@with_model_options
@with_mask_options
@with_report_options
def invert(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Image file, or - for stdin.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Record file (default: IMAGE.inv.safetensors).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Source prompt describing the image.")] = "",
    engine: EngineOpt = "ddim",
    steps: StepsOpt = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g", callback=finite_scale, help="CFG scale of the inversion (default: the engine's; 1 = no guidance).")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for engines that draw noise.")] = 0,
    fit: FitOpt = "pad",
    alpha: AlphaOpt = "composite",
    check: Annotated[bool, typer.Option("--check/--no-check", help="Reconstruct and report the error.")] = True,
    skip: SkipOpt = None, eta: EtaOpt = None, gamma: GammaOpt = None, strength: StrengthOpt = None, start: StartOpt = None,
    stop: StopOpt = None, n_max: NMaxOpt = None, n_min: NMinOpt = None, n_avg: NAvgOpt = None, solver: SolverOpt = None, fixed_point: FixedPointOpt = None,
    share_steps: ShareStepsOpt = None, share_from: ShareFromOpt = None,
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    *, models: ModelChoice, masking: MaskChoice, report: ReportChoice,
):
    """Invert IMAGE to its noise and save a record; reports the round-trip error.

    Example: diffedit invert photo.png -p "a photo of a cat" -o photo.inv.safetensors
    """
    inputs_exist(image, masking.mask)
    report.check(output, overwrite)
    from diffedit.files import check_writable
    from diffedit.images import save_image
    from diffedit.jobs import ImageInput, invert_image, record_mask, show_mask
    from diffedit.records import save_record

    if output is None:
        output = Path(default_output(image, "inv", ".safetensors"))
    check_writable(output, overwrite)
    if masking.show_mask is not None:
        check_writable(masking.show_mask, overwrite)
    mask = masking.input()
    m = models.load(quiet=quiet)
    warn_prompts(m, [prompt, negative_prompt], quiet)
    plan = _invert_plan(m, ctx.params)
    with progress(plan.steps * (2 if check else 1), f"invert ({engine})", quiet) as callback:
        record, result = invert_image(m, image, plan, prompt=prompt, image=ImageInput(fit=fit, alpha=alpha),
                                      mask=mask, check=check, callback=callback)
    save_record(output, record, overwrite)  # the image and a local model named relative to the record
    if masking.show_mask is not None:
        save_image(show_mask(m, record, record_mask(record)), masking.show_mask, overwrite=overwrite)
    report.emit({"output": str(output), **result}, output, quiet, overwrite)


def _invert_plan(model, job: dict):
    """The plan of an invert job (the command's parameters)."""
    from diffedit.plan import plan_job

    spec = guidance_spec(job["guidance"], job["pag_scale"], job["pag_layers"], job["pag_adaptive_scale"])
    params = engine_params(**{k: job[k] for k in INVERT_ENGINE_OPTIONS})
    return plan_job(model, engine=job["engine"], steps=job["steps"], params=params, guidance=spec,
                    inversion_guidance_scale=job["guidance_scale"], negative_prompt=job["negative_prompt"],
                    seed=job["seed"])


INVERT_ENGINE_OPTIONS = ("skip", "eta", "gamma", "strength", "start", "stop", "n_max", "n_min", "n_avg", "solver", "fixed_point",
                         "share_steps", "share_from")


def invert_many(jobs: list[dict]) -> list[dict]:
    """Invert jobs (the command's parameters each) that differ only in INVERT_VARYING, sharing every
    forward (`diffedit batch --batch-size`); each record is the one its job makes alone."""
    from diffedit.jobs import ImageInput, invert_images
    from diffedit.records import save_record

    first = jobs[0]
    for job in jobs:
        check_job_outputs(job)
    m = ModelChoice.of(first).load(quiet=first["quiet"])
    warn_prompts(m, [job["prompt"] for job in jobs] + [first["negative_prompt"]], first["quiet"])
    plan = _invert_plan(m, first)
    with progress(plan.steps * (2 if first["check"] else 1), f"invert ({plan.engine.name})", first["quiet"]) as cb:
        outs = invert_images(m, [job["image"] for job in jobs], plan, prompts=[job["prompt"] for job in jobs],
                             seeds=[job["seed"] for job in jobs], image=ImageInput(fit=first["fit"], alpha=first["alpha"]),
                             check=first["check"], callback=cb)
    results = []
    for job, (record, result) in zip(jobs, outs):
        save_record(job["output"], record, job["overwrite"])
        ReportChoice.of(job).emit({"output": str(job["output"]), **result}, job["output"], job["quiet"], job["overwrite"])
        results.append({"output": str(job["output"]), **result})
    return results


def _plain_invert(job: dict):
    """A job that can share a micro-batch: no mask, files in and out (not stdin)."""
    return (job["mask"] is None and job["mask_from_prompt"] is None and job["show_mask"] is None
            and job["image"] != "-" and job["output"] is not None)


INVERT_VARYING = ("image", "prompt", "seed", "output", "json_out")
BATCHED["invert"] = (invert_many, INVERT_VARYING, _plain_invert)


@app.command()
@with_model_options
@with_report_options
def reconstruct(
    record: Annotated[Path, typer.Argument(help="Record made by `diffedit invert`.")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Image file or - for stdout (default: IMAGE.reconstruct.png beside the record).")] = None,
    against: Annotated[str | None, typer.Option("--against", help="The inverted image, to report the error against (default: the one the record names, if it is still there and unchanged).")] = None,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    *, models: ModelChoice, report: ReportChoice,
):
    """Regenerate the image of a record and report its error: `psnr` against the inverted image,
    `vae_psnr` the VAE's own round trip of it, `psnr_vs_vae` against the decoded record latent.

    Example: diffedit reconstruct photo.inv.safetensors -o back.png
    """
    inputs_exist(record, against)
    report.check(output, overwrite)
    from diffedit.files import check_writable
    from diffedit.jobs import reconstruct_record
    from diffedit.records import load_record

    rec = load_record(record)
    output = output or default_output(record, "reconstruct")
    if output != "-":
        check_writable(output, overwrite)
    m = models.load(rec, quiet=quiet)
    rec.check_model(m, record)
    reference, note = _reference(m, rec, against)
    with progress(rec.meta["steps"], "reconstruct", quiet) as callback:
        image, result = reconstruct_record(m, rec, reference=reference, callback=callback)
    _write_reconstruction(m, record, rec, image, result, note, output, overwrite, quiet, report)


def _reference(model, rec, against: str | None) -> tuple:
    """(the inverted image to compare with or None, why there is none)."""
    from diffedit.errors import DiffeditError
    from diffedit.jobs import record_input

    if against is not None:
        return record_input(model, rec, against), ""
    if not isinstance(rec.meta.get("image"), str) or rec.meta["image"] in ("-", "<memory>"):
        return None, "the record names no input image file (it came from stdin)"
    named = Path(rec.meta["image"])  # load_record resolved it against the record's folder
    if not named.is_file():
        return None, f"{named} is not there"
    try:
        return record_input(model, rec, str(named)), ""
    except DiffeditError:
        return None, f"{named} changed since the inversion"


def _write_reconstruction(model, path, rec, image, result, note, output, overwrite, quiet, report) -> dict:
    from diffedit.images import save_image
    from diffedit.jobs import image_params

    if "psnr" not in result:
        result["note"] = f"{note}: no psnr against the input (--against IMAGE gives it)"
    params = image_params("reconstruct", model, record=str(path), engine=rec.meta["engine"],
                          prompt=rec.meta["source_prompt"], steps=rec.meta["steps"])
    save_image(image, output, params=params, overwrite=overwrite)
    report.emit({"output": output, **result}, output, quiet, overwrite)
    return {"output": output, **result}


def reconstruct_many(jobs: list[dict]) -> list[dict]:
    """Reconstruct records made with one model and plan (their seeds aside) in shared forwards."""
    from diffedit.jobs import reconstruct_records
    from diffedit.records import load_record

    first = jobs[0]
    for job in jobs:
        check_job_outputs(job)
    records = [load_record(job["record"]) for job in jobs]
    m = ModelChoice.of(first).load(records[0], quiet=first["quiet"])
    for job, rec in zip(jobs, records):
        rec.check_model(m, job["record"])
    references = [_reference(m, rec, job["against"]) for job, rec in zip(jobs, records)]
    with progress(records[0].meta["steps"], "reconstruct", first["quiet"]) as callback:
        outs = reconstruct_records(m, records, references=[r for r, _ in references], callback=callback)
    return [_write_reconstruction(m, job["record"], rec, image, result, note, job["output"], job["overwrite"],
                                  job["quiet"], ReportChoice.of(job))
            for job, rec, (image, result), (_, note) in zip(jobs, records, outs, references)]


BATCHED["reconstruct"] = (reconstruct_many, ("record", "output", "against", "json_out"),
                          lambda job: job["output"] not in (None, "-"))
