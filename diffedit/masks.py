"""Edit masks: where an edit may change the image, at pixel and at latent resolution.

A user mask (white = edit) is dilated, optionally inverted, and feathered outwards: the feathered
mask is 1 on the (dilated) mask and falls linearly to 0 over `feather` pixels outside it, so every
pixel farther than that keeps the input's value when the result is pasted back. On the latent grid a
cell is editable when any pixel it covers has a feathered weight above 0; engines keep the source's
latent in every other cell (`Run.keep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.errors import DiffeditError, UsageError


@dataclass(frozen=True)
class MaskOptions:
    """How a user mask becomes the edit region (the command-line `--mask-*` options)."""

    dilate: int = 0  # pixels added around the mask
    feather: int | None = None  # width in pixels of the seam where the edit fades into the input (None: one
    # latent cell, the model's VAE scale: the finest step the latent blend can make)
    invert: bool = False  # edit outside the mask instead

    def check(self) -> None:
        for name in ("dilate", "feather"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 512:
                raise UsageError(f"--mask-{name} {value} must be between 0 and 512 pixels")


@dataclass(frozen=True)
class EditMask:
    """The edit region of one image: `weights` [H, W] float32 in [0, 1] at pixel resolution."""

    weights: np.ndarray

    @classmethod
    def from_image(cls, mask: Image.Image, options: MaskOptions = MaskOptions(), name: str = "mask",
                   cell: int = 8) -> EditMask:
        """From a black/white mask image of the input's (fitted) size; refuses a mask that leaves
        nothing to edit or nothing to keep. `cell`: pixels per latent cell (the default feather)."""
        options.check()
        feather = cell if options.feather is None else options.feather
        hard = np.asarray(mask.convert("L")) > 127
        if options.invert:
            hard = ~hard
        if not hard.any():
            raise DiffeditError(f"{name}: the mask is empty (no pixel to edit)")
        if options.dilate:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * options.dilate + 1,) * 2)
            hard = cv2.dilate(hard.astype(np.uint8), kernel) > 0
        if hard.all():
            raise DiffeditError(f"{name}: the mask covers the whole image; edit without a mask instead")
        if feather:
            # distance of each outside pixel to the nearest mask pixel, falling to weight 0 at `feather`
            distance = cv2.distanceTransform((~hard).astype(np.uint8), cv2.DIST_L2, 5)
            weights = np.clip(1.0 - distance / (feather + 1), 0.0, 1.0)
        else:
            weights = hard.astype(np.float32)
        return cls.of_levels(np.round(weights * 255).astype(np.uint8))

    @classmethod
    def of_levels(cls, levels: np.ndarray) -> EditMask:
        """From 8-bit weights (as a record keeps them): weights are multiples of 1/255, so a mask read
        back from a record is the mask that was used."""
        return cls(levels.astype(np.float32) / 255)

    def levels(self) -> np.ndarray:
        return np.round(self.weights * 255).astype(np.uint8)

    @property
    def edited_fraction(self) -> float:
        return float((self.weights > 0).mean())

    def image(self) -> Image.Image:
        """The feathered mask as an 8-bit grey image (white = edit)."""
        return Image.fromarray(self.levels(), "L")

    def latent(self, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """[1, 1, h, w] of 0/1 on the latent grid: 1 where any covered pixel may change."""
        w = torch.from_numpy(np.ascontiguousarray(self.weights > 0)).float()[None, None]
        return F.adaptive_max_pool2d(w, grid).to(device)

    def paste(self, edited: Image.Image, original: Image.Image) -> Image.Image:
        """The edited image inside the mask, the original's own pixels outside, blended on the seam."""
        if edited.size != original.size or edited.size != self.weights.shape[::-1]:
            raise ValueError("paste: edited image, original and mask differ in size")
        a = self.weights[..., None]
        out = np.asarray(edited, np.float32) * a + np.asarray(original.convert("RGB"), np.float32) * (1 - a)
        return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))

    def overlay(self, image: Image.Image, colour=(255, 40, 40), opacity: float = 0.5) -> Image.Image:
        """The image with the mask tinted over it, for a person to check it."""
        a = opacity * self.weights[..., None]
        out = np.asarray(image.convert("RGB"), np.float32) * (1 - a) + np.asarray(colour, np.float32) * a
        return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
