"""DDIM inversion: the deterministic step run from low to high noise, then sampled back.

With the same prompt and guidance the round trip is close but not exact (the network is evaluated
one level away from where the update assumes it); its error falls as the step count grows.
`solver="dpmpp-2m"` steps both ways with DPM-Solver++ (2M) on its own levels instead, as diffusers'
DPMSolverMultistep(Inverse)Scheduler do (docs/design.md, "Solvers").
"""

from dataclasses import dataclass

from diffedit.engines import Engine, Params, Run, register
from diffedit.errors import UsageError
from diffedit.families import SOLVERS
from diffedit.sampling import invert, sample


@dataclass(frozen=True)
class DDIMParams(Params):
    solver: str = "ddim"
    fixed_point: int = 0  # updates per inversion step towards the sampler's exact inverse (`sampling.invert`)

    def check(self, steps: int) -> None:
        if self.solver not in SOLVERS:
            raise UsageError(f"--solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if not 0 <= self.fixed_point <= 10:
            raise UsageError(f"--fixed-point {self.fixed_point}: choose 0 to 10")
        if self.fixed_point and self.solver != "ddim":  # docs/engines.md, "Fixed-point inversion"
            raise UsageError(f"--fixed-point applies to --solver ddim: a {self.solver} step reads the x0 of the "
                             "level above, which an inversion reaches only after it")


@register
class DDIM(Engine):
    name = "ddim"
    exact = False
    accelerable = True
    Params = DDIMParams

    def resolve(self, params, steps, model):
        params.check(steps)
        if params.solver != "ddim":  # the first-order step runs on every model
            model.check_solver(params.solver)
        return params

    def schedule(self, model, steps, height, width, params):
        return model.schedule(steps, height, width, solver=params.solver)

    def record_tensors(self, steps, params, latent):
        return {"noise": latent}

    def invert(self, run: Run, z0):
        trajectory = invert(run.source, z0, run.schedule, callback=run.callback, fixed_point=run.params.fixed_point)
        return {"noise": trajectory[-1], **run.trajectory_if_masked(trajectory)}

    def edit(self, run: Run, tensors):
        background = run.background(tensors, self.name)  # blended-latent style: the inverted path outside
        keep = None if background is None else lambda i, x, x0: run.keep(x, background[i + 1])
        return sample(run.target, tensors["noise"], run.schedule, callback=run.callback, after_step=keep)
