"""The one step and the one loop every engine shares (DESIGN.md §3).

`x = a*x0 + s*eps` for every family; a step to level j re-mixes the denoiser's `(x0_hat, eps_hat)`
with the coefficients of j, optionally with fresh noise of churn `eta`. The integrator state stays
float32 whatever precision the network runs in; the coefficients are Python floats, so the loop
never waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from diffedit.editing.attention import AttentionControl, Chain, Controller
from diffedit.errors import DiffeditError
from diffedit.families import Cond, Family, Schedule
from diffedit.guidance.cfg import CFG, Guidance, Prediction

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x, x0_hat)


class Denoiser:
    """A model, its per-branch conditioning and a guidance: latents -> guided `(x0_hat, eps_hat)`.

    All branches run in one batched forward; the conditioning is concatenated once per job.
    `calls` counts network forwards (NFE of batched calls).
    """

    def __init__(self, model: Family, conds: dict[str, Cond], guidance: Guidance,
                 controller: Controller | None = None):
        self.model, self.guidance = model, guidance
        self.branches = guidance.branches
        # conditioning of branches that need no text of their own (PAG's perturbed) is the cond's
        self._conds = {b: conds.get(b) or conds["cond"] for b in self.branches}
        self.cond = Cond.cat([self._conds[b] for b in self.branches])
        self._cond_of = {self.branches: self.cond}  # by active branches (adaptive guidance drops some)
        self.dtype = model.dtype  # read once: diffusers' `.dtype` walks every module
        own = guidance.controller(model.network)
        if controller is not None and own is not None:
            controller = Chain(controller, own)
        controller = controller or own
        self.control = None if controller is None else AttentionControl(model.network, controller)
        self.calls = 0
        self.forwards: dict[int, int] = {}  # network calls by batch size
        self.deepcache = None  # a DeepCache to reuse deep UNet features between steps (generate only)

    def __call__(self, x: torch.Tensor, schedule: Schedule, i: int, *, level: int | None = None,
                 inverse: bool = False) -> Prediction:
        """Guided `(x0_hat, eps_hat)` of `x` at level `level` (default i), network at time `i`."""
        level = i if level is None else level
        branches = self.guidance.active_branches()
        cond = self._cond_of.get(branches)
        if cond is None:
            cond = self._cond_of[branches] = Cond.cat([self._conds[b] for b in branches])
        n = len(branches)
        x_in = x.repeat(n, 1, 1, 1) if n > 1 else x
        t = schedule.times[i]
        membranes = self.model.membranes  # SPM adapters: each batch row's multipliers travel in the cond
        rows = membranes.rows(cond.tensors.get("spm")) if membranes is not None else nullcontext()
        with rows, self.deepcache.step(i, len(cond)) if self.deepcache is not None else nullcontext():
            if self.control is None:
                out = self.model.forward(x_in.to(self.dtype), t, cond)
            else:
                self.control.controller.begin(i, branches)
                with self.control:
                    out = self.model.forward(x_in.to(self.dtype), t, cond)
        self.calls += 1
        self.forwards[len(cond)] = self.forwards.get(len(cond), 0) + 1
        if not torch.isfinite(out).all():  # stop here, naming the step, rather than write a black image
            raise DiffeditError(f"step {i + 1} of {len(schedule)}: the network returned NaN/Inf in {self.dtype} "
                                "(half-precision overflow? try --dtype fp32 or bf16)")
        x0, eps = self.model.to_x0_eps(out.float(), x_in, schedule.a[level], schedule.s[level])
        preds = dict(zip(branches, zip(x0.chunk(n), eps.chunk(n))))
        combine = self.guidance.combine_inverse if inverse else self.guidance.combine
        return combine(preds, schedule.t[i])


def prompt_denoiser(
    model: Family, prompts: list[str], guidance: Guidance, height: int, width: int,
    negative_prompt: str = "", embedded_guidance: float = 3.5, controller: Controller | None = None,
) -> Denoiser:
    """Encode the prompts (and the negative prompt if the guidance needs it) once for a job."""
    negatives = [negative_prompt] * len(prompts) if "uncond" in guidance.branches else None
    cond, uncond = model.encode_prompts(prompts, negatives, height, width, embedded_guidance)
    if model.membranes is not None:  # facilitated transport: each prompt's multiplier per SPM adapter
        cond, uncond = model.membranes.tag(cond, prompts), model.membranes.tag(uncond, negatives)
    return Denoiser(model, {"cond": cond, "uncond": uncond}, guidance, controller)


def churn(a_from: float, s_from: float, a_to: float, s_to: float, eta: float) -> float:
    """Std of the fresh noise a stochastic step adds (DDIM's sigma for VP, its analogue for flows)."""
    if eta == 0.0 or s_to == 0.0:
        return 0.0
    ratio = (a_from * s_to) / (a_to * s_from)
    return eta * s_to * math.sqrt(max(0.0, 1.0 - ratio * ratio))


def step(x0: torch.Tensor, eps: torch.Tensor, a_to: float, s_to: float,
         c: float = 0.0, z: torch.Tensor | None = None) -> torch.Tensor:
    """Move to the level (a_to, s_to); with churn c, part of eps is replaced by fresh noise z."""
    if c == 0.0:
        return torch.add(a_to * x0, eps, alpha=s_to)
    return torch.add(a_to * x0, eps, alpha=math.sqrt(max(s_to * s_to - c * c, 0.0))).add_(z, alpha=c)


@torch.inference_mode()
def sample(
    denoise: Denoiser, x: torch.Tensor, schedule: Schedule, *, start: int = 0, eta: float = 0.0,
    noise: Callable[[int], torch.Tensor] | None = None, callback: Callback | None = None,
    refresh: bool = False,
) -> torch.Tensor:
    """Denoise `x` from level `start` to the end of the schedule; `noise(i)` gives z at step i.

    `refresh` takes consistency steps (latent-consistency models): all of the next level's noise is
    fresh, `x = a x0 + s z`.
    """
    a, s = schedule.a, schedule.s
    for i in range(start, len(schedule)):
        x0, eps = denoise(x, schedule, i)
        c = s[i + 1] if refresh else churn(a[i], s[i], a[i + 1], s[i + 1], eta)
        x = step(x0, eps, a[i + 1], s[i + 1], c, noise(i) if c else None)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.inference_mode()
def invert(
    denoise: Denoiser, x: torch.Tensor, schedule: Schedule, *, end: int = 0,
    callback: Callback | None = None,
) -> list[torch.Tensor]:
    """Deterministic inversion from the clean end (level N) up to level `end`.

    Each step evaluates the network at the destination's time on the current latents and converts
    with the current level's coefficients, as diffusers' DDIMInverseScheduler does. Returns the
    trajectory `[x_N, x_{N-1}, ..., x_end]`.
    """
    a, s = schedule.a, schedule.s
    trajectory = [x]
    for i in reversed(range(end, len(schedule))):
        x0, eps = denoise(x, schedule, i, level=i + 1, inverse=True)
        x = step(x0, eps, a[i], s[i])
        trajectory.append(x)
        if callback is not None:
            callback(i, x, x0)
    return trajectory


def initial_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the CPU in float32 from one generator per item, as diffusers does."""
    items = [torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
    return torch.stack(items).to(device)


__all__ = ["CFG", "Denoiser", "churn", "initial_noise", "invert", "prompt_denoiser", "sample", "step"]
