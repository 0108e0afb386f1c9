"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024).

Every noisy latent is drawn independently from the clean one; the noise maps are whatever makes the
stochastic sampler (churn `eta`, 1 by default) land exactly on them. Regenerating with the same maps
reproduces the image to float precision; with another prompt the maps carry the structure over.
"""

from dataclasses import dataclass

import torch

from diffedit.engines import Engine, Params, Run, draw, register
from diffedit.errors import UsageError
from diffedit.sampling import churn, step


def _noise_scale(run: Run, i: int, eta: float) -> float:
    a, s = run.schedule.a, run.schedule.s
    return churn(a[i], s[i], a[i + 1], s[i + 1], eta)


def default_skip(steps: int) -> int:
    """The paper edits from step 36 of 100: the first, noisiest steps would redraw the layout."""
    return round(0.36 * steps)


@dataclass(frozen=True)
class DDPMParams(Params):
    eta: float = 1.0
    skip: int | None = None  # None: the paper's T_skip, 36 of 100 steps

    def check(self, steps: int) -> None:
        if self.skip is not None and not 0 <= self.skip < steps:
            raise UsageError(f"--skip {self.skip} must be at least 0 and below --steps {steps}")
        if not 0 < self.eta <= 1:
            raise UsageError(f"eta {self.eta} must be in (0, 1]")


@register
class EditFriendlyDDPM(Engine):
    name = "ddpm-ef"
    exact = True
    Params = DDPMParams
    default_steps = 100
    default_guidance = (3.5, 15.0)  # source (inversion) and target CFG of the paper's code

    def record_tensors(self, steps, params, latent):
        return {"xs": (steps, *latent), "zs": (steps, *latent)}

    @torch.inference_mode()
    def invert(self, run: Run, z0):
        sched, eta = run.schedule, float(run.params.eta)
        a, s, n = sched.a, sched.s, len(sched)
        gens = run.generators()
        xs = [None] * n
        for i in reversed(range(n)):  # least noisy first: the draw order of diffusers' LEDITS++
            xs[i] = a[i] * z0 + s[i] * draw(gens, z0)
        # The integrator runs in float64 so residuals divided by a small churn stay exact; the noise
        # maps are kept in float64 (the noisy latents are used exactly as stored, in float32).
        z0, xs = z0.double(), [x.double() for x in xs]
        targets = xs[1:] + [z0]  # the last step lands on the clean latent itself
        zs = []
        for i in range(n):
            x0, eps = run.source(xs[i], sched, i)
            c = _noise_scale(run, i, eta)
            residual = targets[i] - step(x0, eps, a[i + 1], s[i + 1], c, torch.zeros_like(z0))
            # A step without churn (a flow's last step) cannot absorb noise: keep the residual itself.
            zs.append(residual / c if c > 0 else residual)
            if run.callback:
                run.callback(i, xs[i], x0)
        return {"xs": torch.stack(xs).float(), "zs": torch.stack(zs)}

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        sched, eta = run.schedule, float(run.params.eta)
        skip = default_skip(len(sched)) if run.params.skip is None else int(run.params.skip)
        a, s = sched.a, sched.s
        xs = tensors["xs"].to(run.model.device, torch.float64)
        zs = tensors["zs"].to(run.model.device, torch.float64)
        # an edit mask keeps the source at every level, the clean latent last
        levels = [*xs, tensors["latent"].to(xs)] if run.region is not None else None
        x = xs[skip]
        for i in range(skip, len(sched)):
            x0, eps = run.target(x, sched, i)
            c = _noise_scale(run, i, eta)
            x = step(x0, eps, a[i + 1], s[i + 1], c, zs[i]) if c > 0 else step(x0, eps, a[i + 1], s[i + 1]) + zs[i]
            if levels is not None:
                x = run.keep(x, levels[i + 1])
            if run.callback:
                run.callback(i, x, x0)
        return x.float()
