"""The guided denoiser: a model, its conditioning per branch, a guidance and the attention
controllers of an edit, as one callable `(x, schedule, i) -> (x0_hat, eps_hat)` that the math of
`diffedit.sampling` steps with.

This is the one place that builds a guidance from the user's `GuidanceSpec` (`prompt_denoiser_for`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from diffedit.editing.attention import AttentionControl, Chain, Controller
from diffedit.errors import DiffeditError, UsageError
from diffedit.families import Cond, Family
from diffedit.guidance import GuidanceSpec
from diffedit.guidance.cfg import Guidance
from diffedit.sampling import Prediction, Schedule


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
        self.prompts = len(self._conds["cond"])
        # by active branches (adaptive guidance drops some) and the prompt rows each holds
        self._cond_of = {(self.branches, (None,) * len(self.branches)): self.cond}
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
        layout = tuple(self._rows(i, b) for b in branches)
        cond = self._cond_of.get((branches, layout))
        if cond is None:
            cond = self._cond_of[branches, layout] = Cond.cat([
                self._conds[b] if rows is None else Cond({k: v[list(rows)] for k, v in self._conds[b].tensors.items()})
                for b, rows in zip(branches, layout)])
        n = len(branches)
        if all(rows is None for rows in layout):
            x_in = x.repeat(n, 1, 1, 1) if n > 1 else x
        else:
            x_in = torch.cat([x if rows is None else x[list(rows)] for rows in layout])
        t = schedule.times[i]
        membranes = self.model.membranes  # SPM adapters: each batch row's multipliers travel in the cond
        rows = membranes.rows(cond.tensors.get("spm")) if membranes is not None else nullcontext()
        with rows, self.deepcache.step(i, len(cond)) if self.deepcache is not None else nullcontext():
            if self.control is None:
                out = self.model.forward(x_in.to(self.dtype), t, cond)
            else:
                self.control.controller.begin(i, branches, layout)
                with self.control:
                    out = self.model.forward(x_in.to(self.dtype), t, cond)
        self.calls += 1
        self.forwards[len(cond)] = self.forwards.get(len(cond), 0) + 1
        if not torch.isfinite(out).all():  # stop here, naming the step, rather than write a black image
            if not torch.isfinite(x_in).all():
                cause = "its input was already NaN/Inf (a corrupt record or latent?)"
            elif self.dtype in (torch.float16, torch.bfloat16):
                cause = "half-precision overflow? try --dtype fp32"
            else:
                cause = "in full precision: the model's weights may hold NaN/Inf"
            raise DiffeditError(f"step {i + 1} of {len(schedule)}: the network returned NaN/Inf in {self.dtype} "
                                f"({cause})")
        x0, eps = self.model.to_x0_eps(out.float(), x_in, schedule.a[level], schedule.s[level])
        sizes = [len(x) if rows is None else len(rows) for rows in layout]
        preds = dict(zip(branches, zip(x0.split(sizes), eps.split(sizes))))
        for b, rows in zip(branches, layout):
            if rows is not None:  # the rows left out read as the cond prediction (see `Guidance.rows`)
                preds[b] = tuple(full.clone().index_copy_(0, torch.tensor(rows, device=x.device), part)
                                 for full, part in zip(preds["cond"], preds[b]))
        combine = self.guidance.combine_inverse if inverse else self.guidance.combine
        return combine(preds, schedule.t[i])

    def _rows(self, i: int, branch: str) -> tuple[int, ...] | None:
        """The prompt rows `branch` holds at step `i`: those the guidance reads and the attention
        controller needs (None: all of them)."""
        rows = None if branch == "cond" else self.guidance.rows(branch)
        if rows is not None and self.control is not None:
            rows = self.control.controller.needed_rows(i, branch, rows)
        return None if rows is None or len(rows) == self.prompts else tuple(sorted(rows))


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


def branch_denoiser(
    model: Family, prompt: str, guidance_scale: float, height: int, width: int,
    negative_prompt: str = "", guidance: GuidanceSpec | None = None,
) -> Denoiser:
    """One prompt's denoiser (see `prompt_denoiser_for`)."""
    return prompt_denoiser_for(model, [prompt], guidance_scale, height, width, negative_prompt, guidance)


def prompt_denoiser_for(
    model: Family, prompts: list[str], guidance_scale: float, height: int, width: int,
    negative_prompt: str = "", guidance: GuidanceSpec | None = None, controller=None,
) -> Denoiser:
    """A denoiser over prompts (one row each) with `guidance` (CFG by default) at `guidance_scale`
    (a list gives each row its own scale) and an optional attention controller.

    Guidance-distilled models (Flux, LCM) take the scale as a network input: their CFG branch is the
    conditional one alone, and CFG++/PAG still apply on top of it.
    """
    guidance = guidance or GuidanceSpec()
    if model.guidance_embedded:
        if guidance.kind.startswith("cfgpp"):
            raise UsageError("CFG++ needs an unconditional branch; guidance-distilled models (Flux, LCM) have none")
        return prompt_denoiser(model, prompts, guidance.build(1.0), height, width, negative_prompt,
                               embedded_guidance=guidance_scale, controller=controller)
    return prompt_denoiser(model, prompts, guidance.build(guidance_scale), height, width, negative_prompt,
                           controller=controller)
