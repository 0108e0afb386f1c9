"""`diffedit generate`."""

from __future__ import annotations

from typing import Annotated

import typer

from diffedit.cli.common import (
    ConfigOpt, DeviceOpt, DtypeOpt, GuidanceOpt, PagAdaptiveOpt, PagLayersOpt, PagScaleOpt, JsonOpt, ModelOpt, OverwriteOpt, PickleOpt, QuietOpt, SeedOpt,
    StepsOpt, emit, guidance_spec, load, progress,
)
from diffedit.cli.main import app


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Image file, or - for stdout.")],
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g", help="CFG scale (embedded guidance for Flux).")] = 7.5,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    eta: Annotated[float, typer.Option("--eta", help="Churn: 0 = deterministic DDIM/Euler, 1 = DDPM-like.")] = 0.0,
    fk_particles: Annotated[int, typer.Option("--fk-particles", help="Feynman-Kac steering with K particles (1 = off).")] = 1,
    fk_lambda: Annotated[float, typer.Option("--fk-lambda", help="FK: reward temperature lambda.")] = 10.0,
    fk_potential: Annotated[str, typer.Option("--fk-potential", help="FK: diff, max or sum.")] = "max",
    fk_every: Annotated[int, typer.Option("--fk-every", help="FK: resample every N steps (in the first 80 %).")] = 5,
    reward: Annotated[str, typer.Option("--reward", help="FK reward: saturation, brightness, checker (toy world) or module:function.")] = "saturation",
    width: Annotated[int | None, typer.Option("--width", "-W", min=8)] = None,
    height: Annotated[int | None, typer.Option("--height", "-H", min=8)] = None,
    guidance: GuidanceOpt = "cfg", pag_scale: PagScaleOpt = 3.0, pag_layers: PagLayersOpt = "mid",
    pag_adaptive_scale: PagAdaptiveOpt = 0.0,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    allow_pickle: PickleOpt = False, model_config: ConfigOpt = None,
    overwrite: OverwriteOpt = False, json: JsonOpt = False, quiet: QuietOpt = False,
):
    """Draw an image from a prompt (DDIM / Euler with classifier-free guidance).

    Example: diffedit generate "a red circle on a white background" --seed 1 -o circle.png
    """
    from diffedit.files import check_writable
    from diffedit.guidance.fk import FKConfig
    from diffedit.images import save_image
    from diffedit.jobs import generate_image, image_params

    if output != "-":
        check_writable(output, overwrite)
    spec = guidance_spec(guidance, pag_scale, pag_layers, pag_adaptive_scale)
    m = load(model, device, dtype, allow_pickle, model_config)
    steps = steps or 50
    with progress(steps, "generate", quiet) as callback:
        image, result = generate_image(
            m, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, width=width, height=height, callback=callback,
            guidance=spec, eta=eta if fk_particles <= 1 else (eta or 1.0), reward=reward,
            fk=FKConfig(fk_particles, fk_lambda, fk_potential, fk_every, eta=eta or 1.0) if fk_particles > 1 else None,
        )
    params = image_params("generate", m, prompt=prompt, negative_prompt=negative_prompt, seed=result["seed"],
                          steps=steps, guidance_scale=guidance_scale, guidance=spec.to_dict(), eta=eta,
                          fk_particles=fk_particles, reward=reward if fk_particles > 1 else None,
                          size=[image.height, image.width])
    save_image(image, output, params=params, overwrite=overwrite)
    emit({"output": output, **result}, json, to_stderr=output == "-")
