"""RF-Inversion (Rout et al., ICLR 2025): controlled inversion and editing for rectified flows.

Inversion steers the unconditional field towards one fixed noise sample y1 with strength `gamma`;
editing steers the target field back towards the source latent with strength `eta` during the
first steps (`start`..`stop`, fractions of the steps). Each controlled field is the model's
prediction blended with the prediction that would lead straight to the anchor (noise y1, or the
source latent z0), which in our `(x0_hat, eps_hat)` terms is a linear blend of the two pairs; the
straight-line fields of the paper are exactly those. Strength 0 is plain Euler inversion/sampling.
The network is evaluated as in every inversion here: at the destination's time (see
`diffedit.sampling.invert`).
"""

from dataclasses import dataclass

import torch

from diffedit.engines import Engine, Params, Run, draw, register
from diffedit.errors import UsageError
from diffedit.sampling import step


def _blend(pred, anchor, weight):
    return tuple(torch.lerp(p, q, weight) for p, q in zip(pred, anchor)) if weight else pred


@dataclass(frozen=True)
class RFInversionParams(Params):
    gamma: float = 0.5
    eta: float = 0.9
    start: float = 0.0
    stop: float = 0.25

    def check(self, steps: int) -> None:
        for key in ("gamma", "eta"):
            if not 0 <= getattr(self, key) <= 1:
                raise UsageError(f"--{key} {getattr(self, key)} must be in [0, 1]")
        if not 0 <= self.start <= self.stop <= 1:
            raise UsageError("rf-inversion needs 0 <= start <= stop <= 1")


@register
class RFInversion(Engine):
    name = "rf-inversion"
    exact = False
    accelerable = True
    Params = RFInversionParams
    default_steps = 28
    default_guidance = (0.0, 3.5)  # unconditional field for inversion, target guidance for the edit

    def record_tensors(self, steps, params, latent):
        return {"noise": latent}

    @torch.inference_mode()
    def invert(self, run: Run, z0):
        sched, gamma = run.schedule, float(run.params.gamma)
        a, s = sched.a, sched.s
        y1 = draw(run.generators(), z0)
        x, path = z0, [z0]
        for i in reversed(range(len(sched))):
            pred = run.source(x, sched, i, level=i + 1, inverse=True)
            towards_noise = ((x - s[i + 1] * y1) / a[i + 1], y1)  # the prediction that lands on y1
            x = step(*_blend(pred, towards_noise, gamma), a[i], s[i])
            path.append(x)
            if run.callback:
                run.callback(i, x, pred[0])
        return {"noise": x, **run.trajectory_if_masked(path)}

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        sched, p = run.schedule, run.params
        a, s = sched.a, sched.s
        z0 = tensors["latent"].to(run.model.device)
        x = tensors["noise"].to(run.model.device)
        first, last = round(p.start * len(sched)), round(p.stop * len(sched))
        background = run.background(tensors, self.name)
        for i in range(len(sched)):
            pred = run.target(x, sched, i)
            towards_source = (z0, (x - a[i] * z0) / s[i])  # the prediction that lands on z0
            x = step(*_blend(pred, towards_source, float(p.eta) if first <= i < last else 0.0), a[i + 1], s[i + 1])
            if background is not None:
                x = run.keep(x, background[i + 1])
            if run.callback:
                run.callback(i, x, pred[0])
        return x
