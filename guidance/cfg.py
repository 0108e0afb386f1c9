"""Guidance as a small object: the branches it needs, and how it combines their predictions.

Every branch runs in one batched forward (see `diffedit.sampling.Denoiser`). `combine` returns the
`x0_hat` used to denoise and the `eps_hat` used to renoise (DESIGN.md §4); plain CFG uses the same
guided prediction for both, so both are the CFG combination of the branch predictions.
"""

from __future__ import annotations

import torch

Prediction = tuple[torch.Tensor, torch.Tensor]  # (x0_hat, eps_hat)


class Guidance:
    """Names the branches it needs and combines their `(x0_hat, eps_hat)` at network time `t`."""

    name = "none"
    branches: tuple[str, ...] = ("cond",)

    def combine(self, preds: dict[str, Prediction], t: float) -> Prediction:
        return preds["cond"]

    def combine_inverse(self, preds: dict[str, Prediction], t: float) -> Prediction:
        """The pair used by an inversion step (the clean estimate, then the renoising direction)."""
        return self.combine(preds, t)

    def controller(self, network):
        """An attention controller the guidance needs on its branches (PAG), or None."""
        return None

    def describe(self) -> dict:
        """Parameters for records and PNG metadata."""
        return {"name": self.name}


class CFG(Guidance):
    """Classifier-free guidance `u + w (c - u)`; a scale of 1 needs only the conditional branch."""

    name = "cfg"

    def __init__(self, scale: float | list[float]):
        """`scale` may be a list: one scale per prompt of the batch (InfEdit's source and target)."""
        per_row = isinstance(scale, (list, tuple))
        self.scale = [float(v) for v in scale] if per_row else float(scale)
        self._weight = torch.tensor(self.scale).view(-1, 1, 1, 1) if per_row else self.scale
        self.branches = ("cond",) if set(self.scale if per_row else [self.scale]) == {1.0} else ("uncond", "cond")

    def combine(self, preds, t):
        if self.branches == ("cond",):
            return preds["cond"]
        (x0_u, eps_u), (x0_c, eps_c) = preds["uncond"], preds["cond"]
        w = self._weight
        if isinstance(w, torch.Tensor) and (w.device != x0_u.device or w.dtype != x0_u.dtype):
            w = self._weight = w.to(x0_u.device, x0_u.dtype)
        return torch.lerp(x0_u, x0_c, w), torch.lerp(eps_u, eps_c, w)  # u + w (c - u)

    def describe(self):
        return {"name": self.name, "scale": self.scale}
