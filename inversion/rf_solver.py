"""RF-Solver (Wang et al., ICML 2025, "Taming Rectified Flow for Inversion and Editing"): inversion and
editing of rectified flows with a second-order step, and RF-Edit's value sharing.

The step is the explicit midpoint rule (`diffedit.sampling.Midpoint`; the paper writes it as a Taylor
step whose time derivative is a finite difference, which is the same update), inverting on the
reversed schedule and sampling back on the forward one: two network evaluations per step, and a
round trip whose error falls with the square of the step size.

Editing shares attention values: for the first `share_steps` steps, a source row runs beside the
target on the stored inversion path (put back on it after every step), and in the attention layers
from `share_from` of the depth on (Flux: single-stream blocks 20-37 of 38, the paper's; SD3: its joint
blocks) the target takes the source row's values (`editing.features.ValueSharing`). The paper saves
those values during the inversion and reads them back; the source row recomputes them at the same
points instead, so a record holds latents only, at the cost of a second batch row for those steps.
"""

from dataclasses import dataclass

import torch

from diffedit.editing.features import ValueSharing, value_layers
from diffedit.engines import Engine, Params, Run, register
from diffedit.errors import UsageError
from diffedit.sampling import Midpoint, sample


@dataclass(frozen=True)
class RFSolverParams(Params):
    share_steps: int = 5  # the paper suggests 2-8; its comparisons use 5
    share_from: float = 20 / 38

    def check(self, steps: int) -> None:
        if not 0 <= self.share_steps <= steps:
            raise UsageError(f"--share-steps {self.share_steps} must be between 0 and the steps ({steps})")
        if not 0 <= self.share_from <= 1:
            raise UsageError(f"--share-from {self.share_from} must be in [0, 1]")


@register
class RFSolver(Engine):
    name = "rf-solver"
    exact = False
    Params = RFSolverParams
    default_steps = 30
    default_guidance = (1.0, 2.0)  # the paper's (Flux's embedded guidance: 1 to invert, 2 to edit)
    reuse_velocity = False

    def model_defaults(self, model):
        if model.prediction != "flow":
            raise UsageError(f"{self.name} needs a rectified-flow model (sd3, flux), not {model.name}")
        return self.default_steps, self.default_guidance

    def record_tensors(self, steps, params, latent):
        return {"trajectory": (steps + 1, *latent[1:])}

    def invert(self, run: Run, z0):
        back = run.schedule.reversed()
        path = [z0]

        def keep_path(i, x, x0):
            path.append(x)
            return x

        sample(run.source, z0, back, solver=Midpoint(back, self.reuse_velocity), callback=run.callback,
               after_step=keep_path)
        return {"trajectory": torch.stack(path[::-1])}  # noisiest first

    def edit(self, run: Run, tensors):
        sched, p = run.schedule, run.params
        path = list(tensors["trajectory"].to(run.model.device))  # each level [images, ...]
        solver = Midpoint(sched, self.reuse_velocity)
        masked = run.region is not None

        def keep(i, x, x0):  # an edit mask: the inversion path outside it
            return run.keep(x, path[i + 1]) if masked else x

        x, shared = path[0], int(p.share_steps)
        if run.reconstructs:
            shared = 0  # a source row would equal the target row: nothing to share
        if shared:
            k = run.images  # rows: the sources, then the targets
            control = ValueSharing(value_layers(run.model.network, float(p.share_from)), end=2 * shared)
            denoise = run.denoiser_for([*run.sources, *run.targets], control,
                                       scales=[run.scales[0]] * k + [run.scales[1]] * k)

            def pin(i, x, x0):  # the source rows back on the inversion path
                return torch.cat([path[i + 1], keep(i, x[k:], x0)])

            x = sample(denoise, torch.cat([x, x]), sched, end=shared, solver=solver, callback=run.callback,
                       after_step=pin)[k:]
        return sample(run.target, x, sched, start=shared, solver=solver, callback=run.callback,
                      after_step=keep if masked else None)
