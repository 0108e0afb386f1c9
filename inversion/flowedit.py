"""FlowEdit (Kulikov et al., ICCV 2025): inversion-free editing of rectified-flow models.

An ODE runs from the source latent towards the edit, driven by the difference of the target and
source velocities on coupled noisy versions of both: at each step a fresh noise makes a noisy
source, and the edit is noised with the same offset. The first `steps - n_max` (noisiest) steps are
skipped; with `n_min` > 0 the last `n_min` steps are ordinary sampling from the edit; `n_avg`
velocity differences are averaged per step. Source and target rows (each with its own guidance
scale) run in one batched forward. With the target prompt and scale equal to the source's the
velocities cancel and the output is the input.
"""

from dataclasses import dataclass, replace

import torch

from diffedit.engines import Engine, Params, Run, draw, register
from diffedit.errors import UsageError
from diffedit.sampling import sample

# Defaults of the paper's configurations: SD3 (true CFG) and Flux (guidance-distilled): steps, n_max,
# source and target guidance. Other step counts keep the paper's fraction n_max / steps.
FAMILY_DEFAULTS = {"sd3": (50, 33, (3.5, 13.5)), "flux": (28, 24, (1.5, 5.5))}


@dataclass(frozen=True)
class FlowEditParams(Params):
    n_max: int | None = None  # None: the paper's fraction of the steps
    n_min: int = 0
    n_avg: int = 1

    def check(self, steps: int) -> None:
        if self.n_max is not None and not 0 <= self.n_min < self.n_max <= steps:
            raise UsageError(f"flowedit needs 0 <= n_min < n_max <= steps (got {self.n_min}, {self.n_max}, {steps})")
        if self.n_avg < 1:
            raise UsageError("--n-avg must be at least 1")


@register
class FlowEdit(Engine):
    name = "flowedit"
    exact = True
    Params = FlowEditParams
    default_steps = 50
    default_guidance = (3.5, 13.5)

    def model_defaults(self, model):
        if model.name not in FAMILY_DEFAULTS:
            raise UsageError(f"flowedit needs a rectified-flow model (sd3, flux), not {model.name}")
        steps, _, guidance = FAMILY_DEFAULTS[model.name]
        return steps, guidance

    def resolve(self, params, steps, model):
        if params.n_max is None:  # the paper's fraction of the steps, written out so records carry it
            paper_steps, paper_n_max, _ = FAMILY_DEFAULTS.get(model.name, FAMILY_DEFAULTS["sd3"])
            params = replace(params, n_max=max(1, round(paper_n_max / paper_steps * steps)))
        params.check(steps)
        return params

    def invert(self, run: Run, z0):
        return {}  # inversion-free: the record's clean latent is all FlowEdit needs

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        sched, p = run.schedule, run.params
        n, n_max, n_min, n_avg = len(sched), int(p.n_max), int(p.n_min), int(p.n_avg)
        a, s = sched.a, sched.s
        x_src = tensors["latent"].to(run.model.device, torch.float32)
        k = run.images  # rows: the sources, then the targets
        denoise = run.denoiser_for([*run.sources, *run.targets], scales=[run.scales[0]] * k + [run.scales[1]] * k)
        gens = run.generators()
        noise = lambda: draw(gens, x_src)  # noqa: E731
        z_edit = x_src
        for i in range(n - n_max, n - n_min):
            v_delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                z_src = a[i] * x_src + s[i] * noise()
                z_tar = z_edit + z_src - x_src
                x0, eps = denoise(torch.cat([z_src, z_tar]), sched, i)
                v = eps - x0  # flow velocity of each row
                v_delta += (v[k:] - v[:k]) / n_avg
            z_edit = run.keep(z_edit + (s[i + 1] - s[i]) * v_delta, x_src)  # an edit mask: the source outside
            if run.callback:
                run.callback(i, z_edit, x0)
        if n_min == 0:
            return z_edit
        # the last n_min steps: ordinary sampling of the target from the noised edit
        i, z = n - n_min, noise()
        x = z_edit + (a[i] * x_src + s[i] * z) - x_src

        def keep(j, x, x0):  # an edit mask: outside it, the source's straight path to its clean latent
            return run.keep(x, a[j + 1] * x_src + s[j + 1] * z)

        return sample(run.target, x, sched, start=i, callback=run.callback,
                      after_step=keep if run.region is not None else None)
