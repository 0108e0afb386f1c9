"""`diffedit bench scale` builds full-size architectures in code: they must be the published ones."""

from __future__ import annotations

import pytest
import torch

from lab.benchmarks.scale import full_size


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family, unet", [("sd1", 859_520_964), ("sdxl", 2_567_463_684)])
def test_full_size_unets_are_the_published_ones(family, unet):
    with torch.device("meta"):  # shapes only: nothing is allocated
        pipe = full_size(family)
    assert _params(pipe.unet) == unet  # Stable Diffusion 1.5's and SDXL's UNet parameter counts


@pytest.mark.parametrize("family, width, heads", [("sd3", 1536, 24), ("flux", 3072, 24)])
def test_cut_transformers_keep_full_width(family, width, heads):
    with torch.device("meta"):
        pipe = full_size(family)
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn.inner_dim == width and blocks[0].attn.heads == heads
    assert pipe.transformer.config.joint_attention_dim == 4096  # T5-XXL's width, as the real models
    assert pipe.text_encoder_3.config.d_model == 4096 if family == "sd3" else pipe.text_encoder_2.config.d_model == 4096
