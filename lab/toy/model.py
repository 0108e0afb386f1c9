"""The toy latent-diffusion model: a StableDiffusionPipeline small enough to train on a 2-core CPU.

A VAE with three levels (64x64 images <-> 16x16x4 latents), a UNet with self- and cross-attention,
and a two-layer CLIP text encoder over whole-word tokens of the shapes world (v1: frozen at its random
initialisation; v2: word-local, trained with the UNet). Saved as an ordinary diffusers folder
(safetensors, fp16) that `StableDiffusionPipeline` loads.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPAttention

from diffedit.tokenizers import clip_word_tokenizer
from diffedit.toy.shapes import VOCAB
from lab.testing import SD_SCHEDULE

MAX_TOKENS = 32  # the longest caption has 19 tokens with the start and end tokens
TEXT_DIM = 64


def make_vae(width: int = 48) -> AutoencoderKL:
    """Channels (width, 2 width, 2 width); v1/v2 shipped width 32, too small to hold the world's scenes,
    plain colours and photos at once (samples/toy-sd/README.md)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(width, 2 * width, 2 * width), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(48, 96, 128), attention_head_dim=4, cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def make_text_encoder(tokenizer, word_local: bool = False) -> CLIPTextModel:
    """A 2-layer CLIP text encoder, frozen (`trainable_text_encoder` unfreezes it). `word_local`: its
    self-attention outputs are zero (out_proj zeroed), so each token's embedding depends only on its
    own word and place. A causal encoder writes a changed word into every later token, and the toy UNet
    read the word there: a one-word prompt-to-prompt edit then changed the values of the whole prompt
    and the layout with them (measured on the first v2, samples/toy-sd/README.md). Still a plain
    `CLIPTextModel`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = CLIPTextModel(config).eval().requires_grad_(False)
    if word_local:
        for attention in _self_attention(encoder):
            torch.nn.init.zeros_(attention.out_proj.weight)
            torch.nn.init.zeros_(attention.out_proj.bias)
    return encoder


def _self_attention(encoder: CLIPTextModel) -> list[torch.nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, CLIPAttention)]


def trainable_text_encoder(encoder: CLIPTextModel) -> CLIPTextModel:
    """The encoder's parameters trainable, except a word-local encoder's (zeroed) self-attention."""
    encoder.requires_grad_(True)
    for attention in _self_attention(encoder):
        if not attention.out_proj.weight.any():
            attention.requires_grad_(False)
    return encoder


def make_tokenizer():
    return clip_word_tokenizer(VOCAB, model_max_length=MAX_TOKENS)


def assemble(vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save(pipe: StableDiffusionPipeline, path) -> None:
    """fp16 weights (the VAE too: its activations stay small at this size), safetensors only."""
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    pipe.to(torch.float32)
