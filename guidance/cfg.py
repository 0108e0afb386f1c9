"""Guidance as a small object: the branches it needs, and how it combines their predictions.

Every branch runs in one batched forward (see `diffedit.denoiser.Denoiser`). `combine` returns the
`x0_hat` used to denoise and the `eps_hat` used to renoise (docs/design.md, "Guidance"); plain CFG uses the same
guided prediction for both, so both are the CFG combination of the branch predictions.
"""

from __future__ import annotations

import torch

from diffedit.sampling import Prediction


def scales(scale: float | list[float]) -> tuple[float | list[float], float | torch.Tensor]:
    """(the scale as given, the weight to lerp with): one for all rows, or one per row."""
    if isinstance(scale, (list, tuple)):
        values = [float(v) for v in scale]
        return values, torch.tensor(values).view(-1, 1, 1, 1)
    return float(scale), float(scale)


def on(weight: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A per-row weight on the device and dtype of the predictions (moved once, then kept)."""
    if isinstance(weight, torch.Tensor) and (weight.device != like.device or weight.dtype != like.dtype):
        return weight.to(like.device, like.dtype)
    return weight


def _as_list(scale) -> list[float]:
    return list(scale) if isinstance(scale, list) else [scale]


class Guidance:
    """Names the branches it needs and combines their `(x0_hat, eps_hat)` at network time `t`."""

    name = "none"
    branches: tuple[str, ...] = ("cond",)

    def active_branches(self) -> tuple[str, ...]:
        """The branches the next forward needs (all of them, except after adaptive guidance converged)."""
        return self.branches

    def rows(self, branch: str) -> frozenset[int] | None:
        """The prompt rows whose combination reads `branch` (None: every row). A row left out gets the
        cond branch's prediction in its place, so leave out only rows that combine it to nothing."""
        return None

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
        self.scale, self.weight = scales(scale)
        self.branches = ("cond",) if set(_as_list(self.scale)) == {1.0} else ("uncond", "cond")

    def rows(self, branch):
        # A row at scale 1 is its cond prediction, u + 1 (c - u) = c: its uncond row is never read
        # (InfEdit's source and layout rows at the paper's source scale 1).
        if branch != "uncond" or not isinstance(self.scale, list) or 1.0 not in self.scale:
            return None
        return frozenset(i for i, w in enumerate(self.scale) if w != 1.0)

    def combine(self, preds, t):
        if self.branches == ("cond",):
            return preds["cond"]
        (x0_u, eps_u), (x0_c, eps_c) = preds["uncond"], preds["cond"]
        w = self.weight = on(self.weight, x0_u)
        return torch.lerp(x0_u, x0_c, w), torch.lerp(eps_u, eps_c, w)  # u + w (c - u)

    def describe(self):
        return {"name": self.name, "scale": self.scale}
