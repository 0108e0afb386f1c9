"""BDIA: bi-directional integration approximation (Zhang, Lewis, Kleijn, ECCV 2024).

Each step after the first combines the DDIM step forward from x_i with what the step backward from
x_i misses of the previous state:

    x_{i+1} = D(x_i -> i+1) + gamma * (x_{i-1} - D(x_i -> i-1))

where both D(.) reuse one network evaluation at x_i. Solved for x_{i-1} it runs backwards exactly,
so inversion is exact given the last two states. The first sampling step (no previous state) is
plain DDIM; in inversion the state next to the clean latent comes from one DDIM inversion step,
and the record keeps the two noisiest states, from which sampling reproduces the clean latent.
The integrator runs in float64 so the 1/gamma of each inverse step does not amplify rounding.
"""

import torch

from diffedit.engines import Engine, Run, register
from diffedit.errors import UsageError
from diffedit.sampling import step


def _ddim_to(x0, eps, schedule, j):
    return step(x0, eps, schedule.a[j], schedule.s[j])


@register
class BDIA(Engine):
    name = "bdia"
    exact = True
    defaults = {"gamma": 0.94}
    default_steps = 50
    default_guidance = (1.0, 7.5)

    def check(self, params: dict, steps: int) -> None:
        if not 0 < params["gamma"] <= 1:
            raise UsageError(f"--gamma {params['gamma']} must be in (0, 1]: at 0 the update cannot be inverted")
        if steps < 2:
            raise UsageError("bdia needs at least 2 steps")

    @torch.inference_mode()
    def invert(self, run: Run, z0):
        sched, gamma, n = run.schedule, float(run.params["gamma"]), len(run.schedule)
        x_next = z0.double()  # level n: the clean latent
        x0, eps = run.source(x_next, sched, n - 1, level=n)
        x = _ddim_to(x0, eps, sched, n - 1)  # level n-1, by one DDIM inversion step
        if run.callback:
            run.callback(n - 1, x, x0)
        for i in range(n - 1, 0, -1):  # from (x_i, x_{i+1}) to x_{i-1}
            x0, eps = run.source(x, sched, i)
            x_prev = _ddim_to(x0, eps, sched, i - 1) + (x_next - _ddim_to(x0, eps, sched, i + 1)) / gamma
            x, x_next = x_prev, x
            if run.callback:
                run.callback(i, x, x0)
        return {"noise": x, "noise_next": x_next}  # float64, kept so by the record

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        sched, gamma = run.schedule, float(run.params["gamma"])
        device = run.model.device
        x_prev, x = tensors["noise"].to(device, torch.float64), tensors["noise_next"].to(device, torch.float64)
        for i in range(1, len(sched)):  # level 0 -> 1 is the stored pair; BDIA from x_1 on
            x0, eps = run.target(x, sched, i)
            x_next = _ddim_to(x0, eps, sched, i + 1) + gamma * (x_prev - _ddim_to(x0, eps, sched, i - 1))
            x_prev, x = x, x_next
            if run.callback:
                run.callback(i, x, x0)
        return x.float()
