"""A job's plan: the engine, its parameters, steps, guidance and scales, resolved once.

CLI options, a batch row and a record all become a `Plan` here, and everything downstream (the
progress bar, the engine's run, the record, the result) reads it. This is the one place an engine
name is resolved (`diffedit.inversion.get_engine`) and the engine's defaults meet the user's values.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffedit.engines import Engine, Params
from diffedit.errors import UsageError
from diffedit.families import Family
from diffedit.guidance import GuidanceSpec
from diffedit.inversion import get_engine


@dataclass(frozen=True)
class Plan:
    """What one inversion, reconstruction or edit runs with."""

    engine: Engine
    params: Params
    steps: int
    guidance: GuidanceSpec
    inversion_scale: float  # CFG of the inversion (and of the source branch)
    edit_scale: float  # CFG of the edit's target branch
    negative_prompt: str = ""
    seed: int = 0
    defaults: str = "paper"  # where the defaults came from: "paper", or the model folder's settings file

    @property
    def batch_key(self) -> tuple:
        """What jobs that share a micro-batch agree on: everything but the seed."""
        return (self.engine.name, self.params, self.steps, self.guidance.to_dict(), self.inversion_scale, self.edit_scale,
                self.negative_prompt)

    @property
    def engine_meta(self) -> dict:
        """The engine as a record names it: its name and every parameter used."""
        return {"name": self.engine.name, **self.params.to_dict()}


SCALES_AND_STEPS = ("steps", "guidance_scale", "inversion_guidance_scale")
# Options whose default is another option's value: a folder's setting of one was chosen with its base,
# so it does not apply when the user sets the base (their --cross-replace then holds for swapped words too).
FOLLOWS = {"cross_replace_edited": "cross_replace"}


def plan_job(model: Family, *, engine: str = "ddim", steps: int | None = None, params: dict | None = None,
             guidance: GuidanceSpec | None = None, guidance_scale: float | None = None,
             inversion_guidance_scale: float | None = None, negative_prompt: str = "", seed: int = 0) -> Plan:
    """The plan of a job from user options (None: the model folder's recommended setting where it has
    one, else the engine's default on this model)."""
    eng = get_engine(engine)
    default_steps, (default_inversion, default_edit) = eng.model_defaults(model)
    given = {k: v for k, v in (params or {}).items() if v is not None}
    user = {"steps": steps, "guidance_scale": guidance_scale, "inversion_guidance_scale": inversion_guidance_scale,
            **given}
    recommended = model.recommended.get("engines", {}).get(engine, {})
    applied = {k: v for k, v in recommended.items()  # where the user said nothing, nor set what it follows
               if user.get(k) is None and user.get(FOLLOWS.get(k, "")) is None}
    steps = applied.get("steps", steps)
    guidance_scale = applied.get("guidance_scale", guidance_scale)
    inversion_guidance_scale = applied.get("inversion_guidance_scale", inversion_guidance_scale)
    steps = default_steps if steps is None else steps
    if steps < 1:
        raise UsageError(f"--steps {steps} must be at least 1")
    folder_options = {k: v for k, v in applied.items() if k not in SCALES_AND_STEPS}
    try:
        options = eng.Params.from_options(engine, {**folder_options, **given})
    except UsageError as err:  # a settings file naming an option the engine does not have
        if not any(f"--{k.replace('_', '-')} " in str(err) for k in folder_options):
            raise
        raise UsageError(f"{model.recommended['file']}: {err}") from None
    resolved = eng.resolve(options, steps, model)
    guidance = guidance or GuidanceSpec()
    return Plan(eng, resolved, steps, guidance,
                guidance.default_scale(default_inversion) if inversion_guidance_scale is None
                else float(inversion_guidance_scale),
                guidance.default_scale(default_edit) if guidance_scale is None else float(guidance_scale),
                negative_prompt, seed, model.recommended["file"] if applied else "paper")


def move_energy_scale(model: Family, energy_scale: float | None) -> tuple[float, str]:
    """PixelMan's energy scale for a move, and where the default came from: the user's value, else the
    model folder's recommendation where the paper's 0.5 fails on it, else the paper's."""
    recommended = model.recommended.get("move", {}).get("energy_scale")
    if energy_scale is not None or recommended is None:
        return (0.5 if energy_scale is None else energy_scale), "paper"
    return float(recommended), model.recommended["file"]


def plan_of_record(model: Family, meta: dict, *, edit: bool = False, guidance_scale: float | None = None,
                   params: dict | None = None) -> Plan:
    """The plan a record was made with. For a reconstruction the target scale is the inversion's; for
    an `edit` it is `guidance_scale`, else the engine's default; `params` override the recorded
    engine options."""
    recorded = {k: v for k, v in meta["engine"].items() if k != "name"}
    if guidance_scale is None and not edit:
        guidance_scale = meta["guidance_scale"]
    return plan_job(model, engine=meta["engine"]["name"], steps=meta["steps"], params={**recorded, **(params or {})},
                    guidance=GuidanceSpec.from_dict(meta.get("guidance")), guidance_scale=guidance_scale,
                    inversion_guidance_scale=meta["guidance_scale"], negative_prompt=meta.get("negative_prompt", ""),
                    seed=meta.get("seed", 0))
