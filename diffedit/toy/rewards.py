"""Rewards of the toy world for FK steering: does the image show what the prompt asks for?"""

from __future__ import annotations

import numpy as np
import torch

from diffedit.toy.checker import check
from diffedit.toy.shapes import COLOURS, SHAPES


def asked_for(prompt: str) -> tuple[str | None, str | None]:
    """The first shape and colour the prompt names (None where it names none)."""
    words = prompt.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    colour = next((w for w in words if w in COLOURS), None)
    return shape, colour


def checker_reward(images: torch.Tensor, prompt: str) -> torch.Tensor:
    """1 per attribute of the prompt's first object the checker reads right on the largest object.

    Images are [K, 3, H, W] in [0, 1]; rewards are 0, 1 or 2 (shape and colour).
    """
    shape, colour = asked_for(prompt)
    rewards = []
    for image in images:
        pixels = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
        found = check(pixels)
        top = found[0] if found else None
        rewards.append(0.0 if top is None else float(top.shape == shape) + float(top.colour == colour))
    return torch.tensor(rewards)
