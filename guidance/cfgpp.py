"""CFG++ (Chung et al., 2024): denoise with the guided prediction at a small scale, renoise with
the unconditional one, so large guidance no longer pushes samples off the data manifold.

For a first-order step this equals CFG with the per-step weight `lam * s_t / (s_t - a_t s_s / a_s)`
(tested as an identity). In DDIM inversion the roles swap: the clean estimate comes from the
unconditional branch and the re-noising from the guided one, as the paper's CFG++ inversion does.
"""

import torch

from diffedit.errors import UsageError
from diffedit.guidance.cfg import Guidance


class CFGpp(Guidance):
    name = "cfgpp"
    branches = ("uncond", "cond")

    def __init__(self, scale: float):
        if not 0.0 <= scale <= 1.0:
            raise UsageError(f"CFG++ scale {scale} must be in [0, 1] (it plays the role of CFG's w at small values)")
        self.scale = float(scale)

    def combine(self, preds, t):
        (x0_u, eps_u), (x0_c, _) = preds["uncond"], preds["cond"]
        return torch.lerp(x0_u, x0_c, self.scale), eps_u

    def combine_inverse(self, preds, t):
        (x0_u, eps_u), (_, eps_c) = preds["uncond"], preds["cond"]
        return x0_u, torch.lerp(eps_u, eps_c, self.scale)

    def describe(self):
        return {"name": self.name, "scale": self.scale}
