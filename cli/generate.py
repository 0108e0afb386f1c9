"""`diffedit generate`."""

from __future__ import annotations

from typing import Annotated

import typer

from diffedit.cli.common import (
    ConfigOpt, DeviceOpt, FKEveryOpt, FKLambdaOpt, FKParticlesOpt, FKPotentialOpt, RewardOpt, DtypeOpt, GuidanceOpt, PagAdaptiveOpt, PagLayersOpt, PagScaleOpt, JsonOpt, ModelOpt, OverwriteOpt, PickleOpt, QuietOpt, SeedOpt,
    StepsOpt, emit, fk_config, guidance_spec, load, progress,
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
    fk_particles: FKParticlesOpt = 1, fk_lambda: FKLambdaOpt = 10.0, fk_potential: FKPotentialOpt = "max",
    fk_every: FKEveryOpt = 5, reward: RewardOpt = "saturation",
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
    from diffedit.images import save_image
    from diffedit.jobs import generate_image, image_params

    if output != "-":
        check_writable(output, overwrite)
    spec = guidance_spec(guidance, pag_scale, pag_layers, pag_adaptive_scale)
    fk = fk_config(fk_particles, fk_lambda, fk_potential, fk_every, eta)
    m = load(model, device, dtype, allow_pickle, model_config)
    steps = steps or 50
    with progress(steps, "generate", quiet) as callback:
        image, result = generate_image(
            m, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, width=width, height=height, callback=callback,
            guidance=spec, eta=eta, reward=reward, fk=fk,
        )
    params = image_params("generate", m, prompt=prompt, negative_prompt=negative_prompt, seed=result["seed"],
                          steps=steps, guidance_scale=guidance_scale, guidance=spec.to_dict(), eta=eta,
                          fk_particles=fk_particles, reward=reward if fk_particles > 1 else None,
                          size=[image.height, image.width])
    save_image(image, output, params=params, overwrite=overwrite)
    emit({"output": output, **result}, json, to_stderr=output == "-")
