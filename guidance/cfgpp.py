"""CFG++ (Chung et al., 2024): denoise with the guided prediction at a small scale, renoise with
the unconditional one, so large guidance no longer pushes samples off the data manifold.

For a first-order step this equals CFG with the per-step weight `lam * s_t / (s_t - a_t s_s / a_s)`
(tested as an identity). In DDIM inversion the roles swap: the clean estimate comes from the
unconditional branch and the re-noising from the guided one, as the paper's CFG++ inversion does.
"""

import torch

from diffedit.errors import UsageError
from diffedit.guidance.cfg import Guidance, on, scales


class CFGpp(Guidance):
    name = "cfgpp"
    branches = ("uncond", "cond")

    def __init__(self, scale: float | list[float]):
        """`scale` may be a list: one lambda per prompt of the batch."""
        self.scale, self.weight = scales(scale)
        for value in (self.scale if isinstance(self.scale, list) else [self.scale]):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"CFG++ scale {value} must be in [0, 1] (it plays the role of CFG's w at small values)")

    def combine(self, preds, t):
        (x0_u, eps_u), (x0_c, _) = preds["uncond"], preds["cond"]
        self.weight = on(self.weight, x0_u)
        return torch.lerp(x0_u, x0_c, self.weight), eps_u

    def combine_inverse(self, preds, t):
        (x0_u, eps_u), (_, eps_c) = preds["uncond"], preds["cond"]
        self.weight = on(self.weight, eps_u)
        return x0_u, torch.lerp(eps_u, eps_c, self.weight)

    def describe(self):
        return {"name": self.name, "scale": self.scale}
