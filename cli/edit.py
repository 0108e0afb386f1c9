"""`diffedit edit`: change an image by changing its prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    ConfigOpt, DeviceOpt, DtypeOpt, GuidanceOpt, PagAdaptiveOpt, PagLayersOpt, PagScaleOpt, EtaOpt, GammaOpt, JsonOpt, ModelOpt, OverwriteOpt, PickleOpt, QuietOpt,
    SkipOpt, StepsOpt, default_steps, emit, guidance_spec, engine_params, load, progress,
)
from diffedit.cli.invert import AlphaOpt, FitOpt
from diffedit.cli.main import app


@app.command()
def edit(
    image: Annotated[str | None, typer.Argument(help="Image file, or - for stdin (omit with --from).")] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="Prompt describing the edited image.")] = "",
    source: Annotated[str, typer.Option("--source", "-s", help="Prompt describing the input image.")] = "",
    output: Annotated[str, typer.Option("--output", "-o", help="Image file, or - for stdout.")] = "edited.png",
    from_record: Annotated[Path | None, typer.Option("--from", help="Reuse a record from `diffedit invert` instead of inverting IMAGE.")] = None,
    engine: Annotated[str, typer.Option("--engine", "-e", help="Inversion/editing engine.")] = "ddim",
    steps: StepsOpt = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g", help="CFG scale of the edit (default: the engine's).")] = None,
    inversion_guidance_scale: Annotated[float | None, typer.Option("--inversion-guidance-scale", help="CFG scale of the inversion (default: the engine's).")] = None,
    skip: SkipOpt = None, eta: EtaOpt = None, gamma: GammaOpt = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    seed: Annotated[int, typer.Option("--seed", help="Seed for engines that draw noise.")] = 0,
    fit: FitOpt = "resize",
    alpha: AlphaOpt = "composite",
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    allow_pickle: PickleOpt = False, model_config: ConfigOpt = None,
    overwrite: OverwriteOpt = False, json: JsonOpt = False, quiet: QuietOpt = False,
):
    """Edit an image by inverting it under --source and regenerating it under --target.

    Example: diffedit edit photo.png -s "a red circle" -t "a blue circle" -o blue.png
    """
    from diffedit.errors import UsageError
    from diffedit.files import check_writable
    from diffedit.images import save_image
    from diffedit.jobs import ImageInput, edit_image, edit_record, image_params
    from diffedit.records import load_record

    if not target:
        raise UsageError("--target is required: the prompt of the edited image")
    if (image is None) == (from_record is None):
        raise UsageError("give either IMAGE or --from RECORD")
    if output != "-":
        check_writable(output, overwrite)
    params = engine_params(skip=skip, eta=eta, gamma=gamma)
    spec = guidance_spec(guidance, pag_scale, pag_layers, pag_adaptive_scale)
    if from_record is not None:
        rec = load_record(from_record)
        m = load(model or rec.meta["model"]["source"], device, dtype, allow_pickle, model_config)
        rec.check_model(m, from_record)
        with progress(rec.meta["steps"], f"edit ({rec.meta['engine']['name']})", quiet) as callback:
            out, result = edit_record(m, rec, target, guidance_scale=guidance_scale, params=params,
                                      callback=callback)
        source, engine = rec.meta["source_prompt"], rec.meta["engine"]["name"]
    else:
        m = load(model, device, dtype, allow_pickle, model_config)
        with progress(2 * default_steps(engine, steps), f"edit ({engine})", quiet) as callback:
            out, result, _ = edit_image(
                m, image, source_prompt=source, target_prompt=target, engine=engine, steps=steps,
                guidance_scale=guidance_scale, inversion_guidance_scale=inversion_guidance_scale,
                negative_prompt=negative_prompt, seed=seed, params=params,
                image=ImageInput(fit=fit, alpha=alpha), guidance=spec, callback=callback,
            )
    meta = image_params("edit", m, image=str(image or from_record), source=source, target=target,
                        engine=engine, steps=result["steps"], guidance_scale=guidance_scale,
                        inversion_guidance_scale=inversion_guidance_scale, seed=seed, engine_params=params,
                        guidance=spec.to_dict())
    save_image(out, output, params=meta, overwrite=overwrite)
    emit({"output": output, **result}, json, to_stderr=output == "-")
