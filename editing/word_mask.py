"""Masks from words: where words of a prompt attend in an image, by the network's cross-attention.

`diffedit mask`, `edit --mask-from-prompt` and `move --mask-from-prompt` find their region here.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from diffedit.denoiser import prompt_denoiser_for
from diffedit.editing.attention import Controller
from diffedit.editing.p2p import find_word, grid_maps, word_tokens
from diffedit.errors import UsageError


def unit_range(m: torch.Tensor) -> torch.Tensor:
    """`m` rescaled to [0, 1] (min-max)."""
    return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)


def mask_from_prompt(model, pixels: torch.Tensor, prompt: str, word: str, seed: int = 0,
                     threshold: float = 0.5) -> torch.Tensor:
    """The region of `word` (one or more words of `prompt`) in `pixels` ([1, 3, H, W] in [-1, 1]), as a
    bool [H, W] mask. Three steps, each measured on ShapesBench scenes of the toy model (IoU with the
    true object mask, 20 tasks: 0.39 -> 0.52 -> 0.66):
    - where the words attend: the conditional cross-attention maps of their tokens, summed over
      layers and five mid-noise levels of the noised image;
    - spread over the object: twice through the self-attention maps of the same passes (pixels of one
      object attend to each other), then normalised to [0, 1] and thresholded;
    - snapped to the image's edges: GrabCut (OpenCV), started from that mask as probable
      foreground and the rest as probable background.
    """
    if not hasattr(model.pipe, "unet"):
        raise UsageError(f"masks from words read UNet cross-attention (sd1, sd2, sdxl), not {model.name}: "
                         "give a --mask file")
    tokenizer = model.pipe.tokenizer
    positions = find_word(tokenizer, word_tokens(tokenizer, prompt), word, "--prompt")
    height, width = pixels.shape[-2:]
    z0 = model.encode_image(pixels)
    recorder = AttentionRecorder(tuple(z0.shape[-2:]))
    denoise = prompt_denoiser_for(model, [prompt], 1.0, height, width, controller=recorder)
    schedule = model.schedule(10, height, width)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(3, 8):
            eps = torch.randn(z0.shape, generator=generator).to(z0.device)
            denoise(schedule.a[i] * z0 + schedule.s[i] * eps, schedule, i)
    m = recorder.cross[0, positions].sum(0).flatten()
    if recorder.affinity is not None:
        affinity = recorder.affinity / recorder.affinity.sum(-1, keepdim=True)
        m = affinity @ (affinity @ m)
    m = F.interpolate(m.reshape(1, 1, *recorder.grid), size=(height, width), mode="bilinear", align_corners=False)
    attended = (unit_range(m[0, 0]) > threshold).cpu().numpy()
    return torch.from_numpy(_snap_to_edges(pixels, attended))


def _snap_to_edges(pixels: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """GrabCut from `mask` (probable foreground) on the image; the mask itself where GrabCut cannot
    run or finds nothing."""
    if mask.all() or not mask.any():
        return mask
    rgb = ((pixels[0].permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    labels = np.where(mask, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means on OpenCV's global generator
    try:
        cv2.grabCut(np.ascontiguousarray(rgb[..., ::-1]), labels, None, *models, 5, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return mask
    found = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    return found if found.any() else mask


class AttentionRecorder(Controller):
    """The conditional branch's head-averaged attention, summed over calls: cross-attention maps per
    token and the self-attention matrix, both on the finest level with at most `MAX_TOKENS` positions
    (its square matrix stays small: 4096 positions is 64 x 64, SD1 at 512 px)."""

    MAX_TOKENS = 4096

    def __init__(self, latent_grid: tuple[int, int]):
        super().__init__()
        h, w = latent_grid
        while h * w > self.MAX_TOKENS:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.grid = (h, w)
        self.cross, self.affinity = None, None

    def wants_maps(self, call):
        return not call.joint and "cond" in call.branches

    def maps(self, call, probs):
        rows = probs[call.rows(probs.shape[0], "cond")]
        if call.cross:
            maps = grid_maps(rows, self.grid)
            self.cross = maps if self.cross is None else self.cross + maps
        elif rows.shape[-1] == self.grid[0] * self.grid[1]:
            matrix = rows.mean(1)[0].float()
            self.affinity = matrix if self.affinity is None else self.affinity + matrix
        return probs
