"""Tiny random-weight pipelines of every family, built in code (nothing is downloaded).

Each forward takes milliseconds, so tests can compare our engines with diffusers' own pipelines
on every architecture. Weights are drawn from `torch.manual_seed(seed)`, so a family and a seed
always give the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from diffedit.tokenizers import clip_word_tokenizer, t5_word_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")

# Enough words for meaningful test prompts; everything else falls back to letters.
WORDS = (
    "a an the of on in and with photo painting drawing cat dog car house tree castle red green "
    "blue yellow purple orange white black grey circle square triangle star background big small"
).split()

SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def _clip_text(tokenizer, hidden: int, projection: int | None = None, act: str = "quick_gelu"):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_text(tokenizer, d_model: int):
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32, **extra,
    ).eval()


def _unet(cross_dim: int, **extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim, **extra,
    ).eval()


def tiny_pipeline(family: str, seed: int = 0):
    """A diffusers pipeline of `family` with tiny random weights; default image size 32x32."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    clip_tok = clip_word_tokenizer(list(WORDS))
    if family in ("sd1", "sd2"):
        sd2 = family == "sd2"
        scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction" if sd2 else "epsilon")
        return StableDiffusionPipeline(
            vae=_vae(), unet=_unet(32, use_linear_projection=sd2),
            text_encoder=_clip_text(clip_tok, 32, act="gelu" if sd2 else "quick_gelu"),
            tokenizer=clip_tok, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        unet = _unet(
            64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
        )
        return StableDiffusionXLPipeline(
            vae=_vae(force_upcast=True), unet=unet, text_encoder=_clip_text(clip_tok, 32),
            text_encoder_2=_clip_text(clip_tok, 32, projection=32), tokenizer=clip_tok,
            tokenizer_2=clip_tok, scheduler=DDIMScheduler(**SD_SCHEDULE),
        )
    t5_tok = t5_word_tokenizer(list(WORDS))
    flow_vae = _vae(shift_factor=0.06, scaling_factor=1.5)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=32,
        ).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=flow_vae, text_encoder=_clip_text(clip_tok, 32, projection=32), tokenizer=clip_tok,
            text_encoder_2=_clip_text(clip_tok, 32, projection=32), tokenizer_2=clip_tok,
            text_encoder_3=_t5_text(t5_tok, 64), tokenizer_3=t5_tok,
        )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=1024,
        base_shift=0.5, max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=flow_vae, text_encoder=_clip_text(clip_tok, 32), tokenizer=clip_tok,
        text_encoder_2=_t5_text(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer,
    )


def tiny_lcm_pipeline(seed: int = 0):
    """A tiny latent-consistency SD1 pipeline: guidance embedded in the UNet, LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    base = tiny_pipeline("sd1", seed)
    unet = _unet(32, time_cond_proj_dim=16)
    return LatentConsistencyModelPipeline(
        vae=base.vae, unet=unet, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        scheduler=LCMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Save `tiny_pipeline(family, seed)` as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path
