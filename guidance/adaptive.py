"""Adaptive guidance (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models", AAAI 2025).

As denoising goes on, the conditional and unconditional predictions line up and CFG's extra branch
stops changing the step. Adaptive guidance runs CFG until the cosine similarity of the two branches'
clean-image estimates reaches a threshold, then the conditional branch alone for the remaining steps (one
forward of half the batch). With several images in the batch it waits until every row agrees.
Not used in inversions: the inversion and the regeneration would drop CFG at different steps and
no longer retrace each other.
"""

from __future__ import annotations

import torch

from diffedit.guidance.cfg import CFG, Guidance


class AdaptiveCFG(Guidance):
    name = "adaptive-cfg"

    def __init__(self, base: CFG, threshold: float):
        self.base, self.threshold = base, float(threshold)
        self.branches = base.branches
        self.converged_at: float | None = None  # network time at which CFG was dropped

    def active_branches(self):
        return ("cond",) if self.converged_at is not None else self.branches

    def combine(self, preds, t):
        if "uncond" not in preds:
            return preds["cond"]
        # compare the clean estimates: the noise estimates agree trivially at high noise (both ~ x_t)
        x0_u, x0_c = preds["uncond"][0], preds["cond"][0]
        similarity = torch.nn.functional.cosine_similarity(x0_u.flatten(1), x0_c.flatten(1), dim=1).min()
        if float(similarity) >= self.threshold:
            self.converged_at = float(t)
        return self.base.combine(preds, t)

    def describe(self):
        return {**self.base.describe(), "adaptive_threshold": self.threshold}
