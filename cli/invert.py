"""`diffedit invert` and `diffedit reconstruct`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    SEED_MAX,
    AlphaOpt,
    EngineOpt,
    EtaOpt,
    FitOpt,
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
    stop: StopOpt = None, n_max: NMaxOpt = None, n_min: NMinOpt = None, n_avg: NAvgOpt = None, solver: SolverOpt = None,
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
    from diffedit.plan import plan_job
    from diffedit.records import save_record

    if output is None:
        output = Path(default_output(image, "inv", ".safetensors"))
    check_writable(output, overwrite)
    if masking.show_mask is not None:
        check_writable(masking.show_mask, overwrite)
    mask = masking.input()
    spec = guidance_spec(guidance, pag_scale, pag_layers, pag_adaptive_scale)
    params = engine_params(skip=skip, eta=eta, gamma=gamma, strength=strength, start=start, stop=stop, n_max=n_max, n_min=n_min,
                           n_avg=n_avg, solver=solver, share_steps=share_steps, share_from=share_from)
    m = models.load(quiet=quiet)
    warn_prompts(m, [prompt, negative_prompt], quiet)
    plan = plan_job(m, engine=engine, steps=steps, params=params, guidance=spec,
                    inversion_guidance_scale=guidance_scale, negative_prompt=negative_prompt, seed=seed)
    with progress(plan.steps * (2 if check else 1), f"invert ({engine})", quiet) as callback:
        record, result = invert_image(m, image, plan, prompt=prompt, image=ImageInput(fit=fit, alpha=alpha),
                                      mask=mask, check=check, callback=callback)
    save_record(output, record, overwrite)  # the image and a local model named relative to the record
    if masking.show_mask is not None:
        save_image(show_mask(m, record, record_mask(record)), masking.show_mask, overwrite=overwrite)
    report.emit({"output": str(output), **result}, output, quiet, overwrite)


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
    from diffedit.errors import DiffeditError
    from diffedit.files import check_writable
    from diffedit.images import save_image
    from diffedit.jobs import image_params, reconstruct_record, record_input
    from diffedit.records import load_record

    rec = load_record(record)
    output = output or default_output(record, "reconstruct")
    if output != "-":
        check_writable(output, overwrite)
    m = models.load(rec, quiet=quiet)
    rec.check_model(m, record)
    reference, note = None, "the record names no input image file (it came from stdin)"
    if against is not None:
        reference = record_input(m, rec, against)
    elif isinstance(rec.meta.get("image"), str) and rec.meta["image"] not in ("-", "<memory>"):
        named = Path(rec.meta["image"])  # load_record resolved it against the record's folder
        note = f"{named} is not there"
        try:
            reference = record_input(m, rec, str(named)) if named.is_file() else None
        except DiffeditError:
            note = f"{named} changed since the inversion"
    with progress(rec.meta["steps"], "reconstruct", quiet) as callback:
        image, result = reconstruct_record(m, rec, reference=reference, callback=callback)
    if "psnr" not in result:
        result["note"] = f"{note}: no psnr against the input (--against IMAGE gives it)"
    params = image_params("reconstruct", m, record=str(record), engine=rec.meta["engine"],
                          prompt=rec.meta["source_prompt"], steps=rec.meta["steps"])
    save_image(image, output, params=params, overwrite=overwrite)
    report.emit({"output": output, **result}, output, quiet, overwrite)
