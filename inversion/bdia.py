"""BDIA: bi-directional integration approximation (Zhang, Lewis, Kleijn, ECCV 2024).

Each step after the first combines the DDIM step forward from x_i with what the step backward from
x_i misses of the previous state:

    x_{i+1} = D(x_i -> i+1) + gamma * (x_{i-1} - D(x_i -> i-1))

where both D(.) reuse one network evaluation at x_i. Solved for x_{i-1} it runs backwards exactly,
so inversion is exact given the last two states. The first sampling step (no previous state) is
plain DDIM; in inversion the state next to the clean latent comes from one DDIM inversion step,
and the record keeps the two noisiest states, from which sampling reproduces the clean latent.
The integrator runs in float64 so the 1/gamma of each inverse step does not amplify rounding.

As in the paper's editing code, only the last `strength` (0.8) of the steps are inverted and
regenerated: the noisiest ones would redraw the layout under a new prompt.
"""

from dataclasses import dataclass

import torch

from diffedit.engines import Engine, Params, Run, register
from diffedit.errors import UsageError
from diffedit.sampling import step


def _ddim_to(x0, eps, schedule, j):
    return step(x0, eps, schedule.a[j], schedule.s[j])


def first_level(steps: int, strength: float) -> int:
    """The noisiest level the inversion reaches (0 = pure noise)."""
    return steps - int(steps * strength)


@dataclass(frozen=True)
class BDIAParams(Params):
    gamma: float = 0.94
    strength: float = 0.8

    def check(self, steps: int) -> None:
        if not 0 < self.gamma <= 1:
            raise UsageError(f"--gamma {self.gamma} must be in (0, 1]: at 0 the update cannot be inverted")
        if not 0 < self.strength <= 1:
            raise UsageError(f"--strength {self.strength} must be in (0, 1]")
        if int(steps * self.strength) < 2:
            raise UsageError(f"bdia needs at least 2 steps to invert: --steps {steps} x --strength "
                             f"{self.strength} leaves {int(steps * self.strength)}")


@register
class BDIA(Engine):
    name = "bdia"
    exact = True
    Params = BDIAParams
    default_steps = 50
    default_guidance = (3.0, 3.0)  # the paper's editing code: CFG 3 both ways

    def record_tensors(self, steps, params, latent):
        return {"noise": latent, "noise_next": latent, "start": ()}

    def check_record(self, tensors, steps, params, name):
        super().check_record(tensors, steps, params, name)
        start, expected = int(tensors["start"]), first_level(steps, float(params.strength))
        if start != expected:
            raise UsageError(f"{name}: the inversion started at level {start}, but {steps} steps at strength "
                             f"{params.strength} start at {expected}; --strength is an inversion option: invert again")

    def path_levels(self, steps, params):
        return steps - first_level(steps, float(params.strength)) + 1

    @torch.inference_mode()
    def invert(self, run: Run, z0):
        sched, gamma, n = run.schedule, float(run.params.gamma), len(run.schedule)
        start = first_level(n, float(run.params.strength))
        x_next = z0.double()  # level n: the clean latent
        x0, eps = run.source(x_next, sched, n - 1, level=n)
        x = _ddim_to(x0, eps, sched, n - 1)  # level n-1, by one DDIM inversion step
        path = [x_next, x]  # levels n, n-1, ..., start
        if run.callback:
            run.callback(n - 1, x, x0)
        for i in range(n - 1, start, -1):  # from (x_i, x_{i+1}) to x_{i-1}
            x0, eps = run.source(x, sched, i)
            x_prev = _ddim_to(x0, eps, sched, i - 1) + (x_next - _ddim_to(x0, eps, sched, i + 1)) / gamma
            x, x_next = x_prev, x
            path.append(x)
            if run.callback:
                run.callback(i, x, x0)
        # float64, kept so by the record, with the level the pair starts at
        return {"noise": x, "noise_next": x_next, "start": torch.tensor(start), **run.trajectory_if_masked(path)}

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        sched, gamma = run.schedule, float(run.params.gamma)
        start = int(tensors["start"])  # checked against the steps and strength with the record (`check_record`)
        device = run.model.device
        x_prev, x = tensors["noise"].to(device, torch.float64), tensors["noise_next"].to(device, torch.float64)
        background = run.background(tensors, self.name)  # levels start, ..., n
        for i in range(start + 1, len(sched)):  # levels start, start + 1 are the stored pair
            x0, eps = run.target(x, sched, i)
            x_next = _ddim_to(x0, eps, sched, i + 1) + gamma * (x_prev - _ddim_to(x0, eps, sched, i - 1))
            if background is not None:
                x_next = run.keep(x_next, background[i + 1 - start])
            x_prev, x = x, x_next
            if run.callback:
                run.callback(i, x, x0)
        return x.float()
