"""DDIM inversion: the deterministic step run from low to high noise, then sampled back.

With the same prompt and guidance the round trip is close but not exact (the network is evaluated
one level away from where the update assumes it); its error falls as the step count grows.
"""

from diffedit.engines import Engine, Run, register
from diffedit.sampling import invert, sample


@register
class DDIM(Engine):
    name = "ddim"
    exact = False
    accelerable = True

    def record_tensors(self, steps, params, latent):
        return {"noise": latent}

    def invert(self, run: Run, z0):
        trajectory = invert(run.source, z0, run.schedule, callback=run.callback)
        return {"noise": trajectory[-1], **run.trajectory_if_masked(trajectory)}

    def edit(self, run: Run, tensors):
        background = run.background(tensors, self.name)  # blended-latent style: the inverted path outside
        keep = None if background is None else lambda i, x, x0: run.keep(x, background[i + 1 : i + 2])
        return sample(run.target, tensors["noise"], run.schedule, callback=run.callback, after_step=keep)
