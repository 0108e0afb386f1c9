"""Writing a diffusers Stable Diffusion 1.x pipeline as one original-layout ("LDM") checkpoint.

The layout is the CompVis one that single-file loaders (A1111, ComfyUI, diffusers'
`from_single_file`) read: `model.diffusion_model.*` (UNet: input/middle/output blocks),
`first_stage_model.*` (VAE: encoder/decoder down/up blocks, 1x1-conv attention) and
`cond_stage_model.transformer.*` (the CLIP text model). Key names follow the original code;
`diffedit models export` uses this, and the tests load the result back with diffusers.
"""

from __future__ import annotations

import torch

from diffedit.errors import DiffeditError

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename(key: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if key.startswith(new + ".") or key == new:
            return old + key[len(new):]
    return key


def _slot(kind: str, tail: str) -> str:
    """A ResNet (slot 0, layers renamed) or attention (slot 1) layer inside an input/output block."""
    return f"0.{_rename(tail, _RESNET)}" if kind == "resnets" else f"1.{tail}"


def ldm_unet_name(unet, key: str) -> str:
    """The original-layout name (after `model.diffusion_model.`) of a diffusers UNet weight or layer."""
    cfg, per = unet.config, unet.config.layers_per_block + 1
    parts = key.split(".")
    head, suffix = parts[0], "".join("." + p for p in parts[5:])  # suffix: what follows a sampler's conv
    if any(key.startswith(k + ".") or key == k for k in _TOP):
        return _rename(key, _TOP)
    if head == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * per + cfg.layers_per_block}.0.op{suffix}"
        return f"input_blocks.{1 + b * per + int(parts[3])}.{_slot(kind, '.'.join(parts[4:]))}"
    if head == "mid_block":
        kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}." + (_rename(tail, _RESNET) if kind == "resnets" else tail)
    if head == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            has_attention = hasattr(unet.up_blocks[b], "attentions")
            return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.conv{suffix}"
        return f"output_blocks.{b * per + int(parts[3])}.{_slot(kind, '.'.join(parts[4:]))}"
    raise DiffeditError(f"cannot export UNet weight {key!r} to the original layout")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + ldm_unet_name(unet, key): value for key, value in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out." + ".".join(parts[2:])
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            block = f"down.{i}" if side == "encoder" else f"up.{n_up - 1 - i}"
            if parts[3] == "resnets":
                new = f"{side}.{block}.block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{block}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + ".".join(parts[6:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                tail = ".".join(parts[4:])
                new = f"{side}.mid.attn_1." + _rename(tail, attention)
                if value.ndim == 2:  # the original attention uses 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            raise DiffeditError(f"cannot export VAE weight {key!r} to the original layout")
        out["first_stage_model." + new] = value
    return out


def to_single_file(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as an original-layout state dict (SD 1.x)."""
    if family != "sd1":
        raise DiffeditError(f"export to a single file is implemented for sd1 models, not {family}")
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for key, value in pipe.text_encoder.state_dict().items():
        # the original layout nests the text model (recent transformers drop that level in state dicts)
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return {k: v.detach().contiguous() for k, v in state.items()}
