"""Masks from words: where words of a prompt attend in an image, by the network's cross-attention.

`diffedit mask`, `edit --mask-from-prompt` and `move --mask-from-prompt` find their region here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffedit.denoiser import prompt_denoiser_for
from diffedit.editing.attention import Controller
from diffedit.editing.p2p import find_word, grid_maps, word_tokens


def unit_range(m: torch.Tensor) -> torch.Tensor:
    """`m` rescaled to [0, 1] (min-max)."""
    return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)


def mask_from_prompt(model, pixels: torch.Tensor, prompt: str, word: str, seed: int = 0,
                     threshold: float = 0.5) -> torch.Tensor:
    """The object's mask from where `word` of `prompt` attends: the conditional cross-attention maps
    of its tokens, summed over layers and five mid-noise levels of the noised image, normalised to
    [0, 1] and thresholded, at pixel resolution."""
    tokenizer = model.pipe.tokenizer
    positions = find_word(tokenizer, word_tokens(tokenizer, prompt), word, "--prompt")
    height, width = pixels.shape[-2:]
    z0 = model.encode_image(pixels)
    recorder = CrossAttentionRecorder(tuple(z0.shape[-2:]))
    denoise = prompt_denoiser_for(model, [prompt], 1.0, height, width, controller=recorder)
    schedule = model.schedule(10, height, width)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(3, 8):
            eps = torch.randn(z0.shape, generator=generator).to(z0.device)
            denoise(schedule.a[i] * z0 + schedule.s[i] * eps, schedule, i)
    m = recorder.sum[0, positions].sum(0)[None, None]
    m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return (unit_range(m) > threshold).cpu()


class CrossAttentionRecorder(Controller):
    """Sums the conditional branch's cross-attention maps, head-averaged, on the latent grid."""

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        self.grid, self.sum = grid, None

    def wants_maps(self, call):
        return call.cross and not call.joint and "cond" in call.branches

    def maps(self, call, probs):
        maps = grid_maps(probs[call.rows(probs.shape[0], "cond")], self.grid)
        self.sum = maps if self.sum is None else self.sum + maps
        return probs
