"""`diffedit edit`: change an image by changing its prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    BATCHED,
    ENGINE_PANEL,
    GUIDANCE_PANEL,
    MASK_PANEL,
    SEED_MAX,
    AdaptiveGuidanceOpt,
    AlphaOpt,
    DeepCacheOpt,
    EngineOpt,
    EtaOpt,
    FitOpt,
    FixedPointOpt,
    FKEveryOpt,
    FKLambdaOpt,
    FKParticlesOpt,
    FKPotentialOpt,
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
    RewardOpt,
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
    fk_config,
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
def edit(
    ctx: typer.Context,
    image: Annotated[str | None, typer.Argument(help="Image file, or - for stdin (omit with --from).")] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Prompt describing the edited image.")] = "",
    source: Annotated[str, typer.Option("--source", "-s", help="Prompt describing the input image.")] = "",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Image file, or - for stdout (default: IMAGE.edit.png beside the input).")] = None,
    from_record: Annotated[Path | None, typer.Option("--from", help="Reuse a record of `diffedit invert`.")] = None,
    engine: EngineOpt = "ddim",
    steps: StepsOpt = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g", callback=finite_scale, help="CFG scale of the edit (default: the engine's).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for engines that draw noise.")] = 0,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    skip: SkipOpt = None, eta: EtaOpt = None, gamma: GammaOpt = None, strength: StrengthOpt = None, start: StartOpt = None,
    stop: StopOpt = None, n_max: NMaxOpt = None, n_min: NMinOpt = None, n_avg: NAvgOpt = None, solver: SolverOpt = None, fixed_point: FixedPointOpt = None,
    share_steps: ShareStepsOpt = None, share_from: ShareFromOpt = None,
    cross_replace: Annotated[float | None, typer.Option("--cross-replace", help="direct/ddim-p2p/infedit: fraction of steps the target borrows the source's cross-attention.", rich_help_panel=ENGINE_PANEL)] = None,
    cross_replace_edited: Annotated[float | None, typer.Option("--cross-replace-edited", help="direct/ddim-p2p word swaps: fraction of steps the swapped words borrow the source word's map (default: --cross-replace); lower lets a new shape form.", rich_help_panel=ENGINE_PANEL)] = None,
    self_replace: Annotated[float | None, typer.Option("--self-replace", help="direct/ddim-p2p/infedit: fraction of steps with self-attention control.", rich_help_panel=ENGINE_PANEL)] = None,
    p2p_mode: Annotated[str | None, typer.Option("--p2p-mode", help="direct/ddim-p2p: replace (word swap), refine (added words) or auto.", rich_help_panel=ENGINE_PANEL)] = None,
    reweight: Annotated[list[str] | None, typer.Option("--reweight", help="direct/ddim-p2p: WORD=FACTOR, scale a target word's attention (repeatable).", rich_help_panel=ENGINE_PANEL)] = None,
    blend: Annotated[list[str] | None, typer.Option("--blend", help="Local blend: edit only where WORD attends (repeatable).", rich_help_panel=ENGINE_PANEL)] = None,
    blend_threshold: Annotated[float | None, typer.Option("--blend-threshold", help="Local blend mask threshold.", rich_help_panel=ENGINE_PANEL)] = None,
    inject_features: Annotated[float | None, typer.Option("--inject-features", help="direct/ddim-p2p/infedit: fraction of steps the target takes the source's decoder features (plug-and-play; 0.4 keeps layouts on the toy model).", rich_help_panel=ENGINE_PANEL)] = None,
    feature_layers: Annotated[str | None, typer.Option("--feature-layers", help="Comma-separated UNet modules for --inject-features (default: up_blocks.1.resnets.1, PnP's).", rich_help_panel=ENGINE_PANEL)] = None,
    show_attention: Annotated[Path | None, typer.Option("--show-attention", help="Write a PNG grid of the target's cross-attention map per token.", rich_help_panel=ENGINE_PANEL)] = None,
    inversion_guidance_scale: Annotated[float | None, typer.Option("--inversion-guidance-scale", callback=finite_scale, help="CFG scale of the inversion (default: the engine's).", rich_help_panel=GUIDANCE_PANEL)] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", rich_help_panel=GUIDANCE_PANEL)] = "",
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0,
    adaptive_guidance: AdaptiveGuidanceOpt = None, deepcache: DeepCacheOpt = None,
    fit: FitOpt = "pad", alpha: AlphaOpt = "composite",
    fk_particles: FKParticlesOpt = 1, fk_lambda: FKLambdaOpt = 10.0, fk_potential: FKPotentialOpt = "max",
    fk_every: FKEveryOpt = 5, reward: RewardOpt = "saturation",
    paste_back: Annotated[bool, typer.Option("--paste-back/--no-paste-back", help="Outside the mask, the input's own pixels (a VAE round trip costs detail), blended over the feathered seam; --no-paste-back: the VAE's round trip of the input there.", rich_help_panel=MASK_PANEL)] = True,
    *, models: ModelChoice, masking: MaskChoice, report: ReportChoice,
):
    """Edit an image by inverting it under --source and regenerating it under --target.

    Example: diffedit edit photo.png -s "a red circle" -t "a blue circle" -o blue.png
    """
    inputs_exist(image, from_record, masking.mask)  # before the heavy imports: a typo is answered at once
    output = output or default_output(image if image is not None else from_record, "edit")
    report.check(output, overwrite)
    from diffedit.errors import UsageError
    from diffedit.files import check_writable
    from diffedit.images import save_image
    from diffedit.jobs import ImageInput, edit_image, edit_record, mask_for_record, record_mask, show_mask
    from diffedit.plan import plan_job, plan_of_record
    from diffedit.records import load_record

    if not target:
        raise UsageError("--target is required: the prompt of the edited image")
    if (image is None) == (from_record is None):
        raise UsageError("give either IMAGE or --from RECORD")
    if output != "-":
        check_writable(output, overwrite)
    params = _engine_params(ctx.params)
    for path in (show_attention, masking.show_mask):
        if path is not None:
            check_writable(path, overwrite)
    mask = masking.input(paste_back)
    fk = fk_config(fk_particles, fk_lambda, fk_potential, fk_every, None)
    spec = guidance_spec(guidance, pag_scale, pag_layers, pag_adaptive_scale)
    if from_record is not None:
        rec = load_record(from_record)
        m = models.load(rec, quiet=quiet)
        warn_prompts(m, [target], quiet)
        rec.check_model(m, from_record)
        plan = plan_of_record(m, rec.meta, edit=True, guidance_scale=guidance_scale, params=params)
        edit_mask = mask_for_record(m, rec, mask) if mask is not None else record_mask(rec)
        with progress(plan.steps, f"edit ({plan.engine.name})", quiet) as callback:
            out, result = edit_record(m, rec, target, plan, callback=callback, show_attention=show_attention is not None,
                                      fk=fk, reward=reward, adaptive_guidance=adaptive_guidance, deepcache=deepcache,
                                      mask=edit_mask, paste_back=paste_back)
        source, engine = rec.meta["source_prompt"], rec.meta["engine"]["name"]
    else:
        m = models.load(quiet=quiet)
        warn_prompts(m, [source, target, negative_prompt], quiet)
        plan = plan_job(m, engine=engine, steps=steps, params=params, guidance=spec, guidance_scale=guidance_scale,
                        inversion_guidance_scale=inversion_guidance_scale, negative_prompt=negative_prompt, seed=seed)
        with progress(2 * plan.steps, f"edit ({engine})", quiet) as callback:
            out, result, rec = edit_image(
                m, image, plan, source_prompt=source, target_prompt=target,
                image=ImageInput(fit=fit, alpha=alpha), callback=callback,
                show_attention=show_attention is not None, fk=fk, reward=reward,
                adaptive_guidance=adaptive_guidance, deepcache=deepcache, mask=mask,
            )
        edit_mask = record_mask(rec)
    maps = result.pop("attention_maps", None), result.pop("attention_tokens", None)
    save_image(out, output, params=_made_with(m, ctx.params, plan, source, engine, edit_mask), overwrite=overwrite)
    if masking.show_mask is not None:
        save_image(show_mask(m, rec, edit_mask), masking.show_mask, overwrite=overwrite)
    if show_attention is not None:
        from diffedit.editing.p2p import attention_grid

        if maps[0] is None:
            raise UsageError(f"--show-attention: engine {engine} does not control attention (use direct, ddim-p2p)")
        save_image(attention_grid(*maps), show_attention, overwrite=overwrite)
    report.emit({"output": output, **result}, output, quiet, overwrite)


def _engine_params(job: dict) -> dict:
    """The engine options an edit job (the command's parameters) gives."""
    layers = job["feature_layers"]
    return engine_params(**{k: job[k] for k in ENGINE_OPTIONS}, blend=job["blend"] or None,
                         reweight=_reweights(job["reweight"]),
                         feature_layers=layers.split(",") if layers is not None else None)


ENGINE_OPTIONS = ("skip", "eta", "gamma", "strength", "start", "stop", "n_max", "n_min", "n_avg", "solver", "fixed_point", "share_steps",
                  "share_from", "cross_replace", "cross_replace_edited", "self_replace", "p2p_mode", "blend_threshold", "inject_features")


def _made_with(model, job: dict, plan, source: str, engine: str, edit_mask) -> dict:
    """What the output PNG carries so the edit can be reproduced."""
    from diffedit.images import made_from
    from diffedit.jobs import image_params

    image = job["image"]
    return image_params("edit", model, image=str(image or job["from_record"]), made_from=made_from(image), source=source,
                        target=job["target"], engine=engine, steps=plan.steps, guidance_scale=plan.edit_scale,
                        inversion_guidance_scale=plan.inversion_scale, seed=plan.seed,
                        engine_params=plan.params.to_dict(), guidance=plan.guidance.to_dict(), defaults=plan.defaults,
                        adaptive_guidance=job["adaptive_guidance"], deepcache=job["deepcache"],
                        mask=job["mask"], mask_from_prompt=job["mask_from_prompt"],
                        mask_dilate=job["mask_dilate"], mask_feather=job["mask_feather"],
                        invert_mask=job["invert_mask"], paste_back=job["paste_back"] if edit_mask is not None else None)


def edit_many(jobs: list[dict]) -> list[dict]:
    """Edit jobs (the command's parameters each) that differ only in EDIT_VARYING, sharing every forward
    (`diffedit batch --batch-size`): all from images or all from records; each output is the one its
    job makes alone."""
    from dataclasses import replace

    from diffedit.errors import UsageError
    from diffedit.images import save_image
    from diffedit.jobs import ImageInput, edit_images, edit_records
    from diffedit.plan import plan_job, plan_of_record
    from diffedit.records import load_record

    first = jobs[0]
    for job in jobs:
        if not job["target"]:
            raise UsageError("--target is required: the prompt of the edited image")
        check_job_outputs(job)
    params, targets = _engine_params(first), [job["target"] for job in jobs]
    if first["from_record"] is not None:
        records = [load_record(job["from_record"]) for job in jobs]
        m = ModelChoice.of(first).load(records[0], quiet=first["quiet"])
        warn_prompts(m, targets, first["quiet"])
        for job, rec in zip(jobs, records):
            rec.check_model(m, job["from_record"])
        plans = [plan_of_record(m, rec.meta, edit=True, guidance_scale=first["guidance_scale"], params=params)
                 for rec in records]
        with progress(plans[0].steps, f"edit ({plans[0].engine.name})", first["quiet"]) as callback:
            outs = [(out, result, rec) for (out, result), rec
                    in zip(edit_records(m, records, targets, plans, callback=callback), records)]
    else:
        m = ModelChoice.of(first).load(quiet=first["quiet"])
        warn_prompts(m, [job["source"] for job in jobs] + targets + [first["negative_prompt"]], first["quiet"])
        spec = guidance_spec(first["guidance"], first["pag_scale"], first["pag_layers"], first["pag_adaptive_scale"])
        plan = plan_job(m, engine=first["engine"], steps=first["steps"], params=params, guidance=spec,
                        guidance_scale=first["guidance_scale"],
                        inversion_guidance_scale=first["inversion_guidance_scale"],
                        negative_prompt=first["negative_prompt"], seed=first["seed"])
        plans = [replace(plan, seed=job["seed"]) for job in jobs]
        with progress(2 * plan.steps, f"edit ({plan.engine.name})", first["quiet"]) as callback:
            outs = edit_images(m, [job["image"] for job in jobs], plan, source_prompts=[job["source"] for job in jobs],
                               target_prompts=targets, seeds=[job["seed"] for job in jobs],
                               image=ImageInput(fit=first["fit"], alpha=first["alpha"]), callback=callback)
    results = []
    for job, plan, (out, result, rec) in zip(jobs, plans, outs):
        made_with = _made_with(m, job, plan, rec.meta["source_prompt"], rec.meta["engine"]["name"], None)
        save_image(out, job["output"], params=made_with, overwrite=job["overwrite"])
        ReportChoice.of(job).emit({"output": job["output"], **result}, job["output"], job["quiet"], job["overwrite"])
        results.append({"output": job["output"], **result})
    return results


def _plain_edit(job: dict):
    """Jobs that can share a micro-batch: no mask, attention preview, FK steering or accelerator; files
    in and out. Jobs from images and jobs from records batch apart."""
    alone = (job["mask"], job["mask_from_prompt"], job["show_mask"], job["show_attention"], job["adaptive_guidance"],
             job["deepcache"])
    if any(v is not None for v in alone) or job["fk_particles"] > 1 or "-" in (job["image"], job["output"]):
        return False
    return "record" if job["from_record"] is not None else "image"


EDIT_VARYING = ("image", "from_record", "source", "target", "seed", "output", "json_out")
BATCHED["edit"] = (edit_many, EDIT_VARYING, _plain_edit)


def _reweights(items: list[str] | None) -> dict[str, float] | None:
    from diffedit.errors import UsageError

    if not items:
        return None
    out = {}
    for item in items:
        word, _, value = item.partition("=")
        try:
            out[word.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. blue=2") from None
    return out
