"""The toy latent-diffusion model: a StableDiffusionPipeline small enough to train on a 2-core CPU.

A VAE with three levels (64x64 images <-> 16x16x4 latents), a UNet with self- and cross-attention,
and a two-layer CLIP text encoder over whole-word tokens of the shapes world (v1: frozen at its random
initialisation; v2, v3: word-local, trained with the UNet; the v4 candidate: previous-word;
`make_text_encoder` says what each means). Saved as an ordinary diffusers folder (safetensors, fp16) that `StableDiffusionPipeline` loads.
"""

from __future__ import annotations

import math

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
    plain colours and photos at once (samples/toy-sd/v3.md)."""
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


TEXT_CONTEXTS = ("word", "previous", "causal")
POSITION_CODE = slice(48, TEXT_DIM)  # "previous": dims that carry a fixed position code and no word
_CODE_FREQUENCIES = (10, 12, 14, 16, 18, 22, 28)  # x 2 pi / 64: the sharpest previous-word peak of 7 (searched)
_CODE_NORM = 0.2  # about a trained word embedding's norm, so the code and the word share the layer norm
_CODE_GAIN = 4.0  # of the query and key: the previous word's score beats every other by 90 at the start


def make_text_encoder(tokenizer, context: str = "causal") -> CLIPTextModel:
    """A 2-layer CLIP text encoder, frozen (`trainable_text_encoder` unfreezes it), its tokens seeing
    - "word" (v2, v3): only their own word and place: self-attention outputs are zero (out_proj zeroed).
      A causal encoder writes a changed word into every later token, and the toy UNet read the word
      there: a one-word prompt-to-prompt edit then changed the values of the whole prompt and the
      layout with them (measured on the first v2, samples/toy-sd/v3.md);
    - "previous" (v4, shipped): their own word and the word before it, so a shape's token carries its colour ("a red
      circle": "circle" knows "red"), and a one-word edit changes two tokens of one object. The word
      alone leaves the UNet to bind colours to shapes by token position, which it does not learn
      (two-object prompts, samples/toy-sd/v3.md). The first layer's attention is fixed to look one
      token back (`_look_one_back`), the second's output zeroed;
    - "causal": every earlier word (CLIP's causal mixing, v1's kind).
    Still a plain `CLIPTextModel`."""
    if context not in TEXT_CONTEXTS:
        raise ValueError(f"text context {context!r}: expected one of {', '.join(TEXT_CONTEXTS)}")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = CLIPTextModel(config).eval().requires_grad_(False)
    attentions = _self_attention(encoder)
    if context == "previous":
        _look_one_back(encoder, attentions[0])
    for attention in {"word": attentions, "previous": attentions[1:], "causal": []}[context]:
        torch.nn.init.zeros_(attention.out_proj.weight)
        torch.nn.init.zeros_(attention.out_proj.bias)
    return encoder


def _look_one_back(encoder: CLIPTextModel, attention: torch.nn.Module) -> None:
    """Fix `attention` (the first layer's) so that every token attends to the token before it (the
    start token to itself). The position embedding's last 16 dims (`POSITION_CODE`, none of any word
    embedding) hold sinusoids s_i of the position i; the queries and keys read them and nothing else,
    the query turned one position back: q_i . k_j ~ sum_k cos(w_k (i - 1 - j)), largest at j = i - 1.
    The code lives in the 16-point Fourier basis orthogonal to the constant vector, so the layer norm's
    mean, which the words move, cancels out of q and k; its layer norm's scale and shift stay 1 and 0. The
    values and output start at zero output and are learned: what a word takes from the one before."""
    w = 2 * math.pi * torch.tensor(_CODE_FREQUENCIES, dtype=torch.float64) / 64
    n = torch.arange(16, dtype=torch.float64)
    basis = torch.stack([f(2 * math.pi * k * n / 16) for k in range(1, 8) for f in (torch.cos, torch.sin)], 1) / math.sqrt(8)
    pos = torch.arange(MAX_TOKENS, dtype=torch.float64)[:, None]
    code = torch.stack([torch.cos(w * pos), torch.sin(w * pos)], -1).flatten(1)  # positions x 14, (cos, sin) pairs
    back = torch.zeros(14, 14, dtype=torch.float64)  # rotates each pair by -w: s_i -> s_(i-1)
    for k, wk in enumerate(w):
        c, s = math.cos(wk), math.sin(wk)
        back[2 * k: 2 * k + 2, 2 * k: 2 * k + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    embeddings = encoder.get_input_embeddings().weight
    positions = encoder.embeddings.position_embedding.weight
    with torch.no_grad():
        embeddings[:, POSITION_CODE] = 0
        positions[:, POSITION_CODE] = (_CODE_NORM / math.sqrt(7) * code @ basis.T).float()
        head = attention.head_dim
        for p in (attention.q_proj, attention.k_proj):
            p.weight.zero_(), p.bias.zero_()
        for h in range(attention.num_heads):
            rows = slice(h * head, h * head + 14)
            attention.k_proj.weight[rows, POSITION_CODE] = (_CODE_GAIN * basis.T).float()
            attention.q_proj.weight[rows, POSITION_CODE] = (_CODE_GAIN * back @ basis.T).float()
        torch.nn.init.zeros_(attention.out_proj.weight)
        torch.nn.init.zeros_(attention.out_proj.bias)
    layer_norm = encoder.encoder.layers[0].layer_norm1
    torch.nn.init.ones_(layer_norm.weight), torch.nn.init.zeros_(layer_norm.bias)


def _self_attention(encoder: CLIPTextModel) -> list[torch.nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, CLIPAttention)]


def text_context(encoder: CLIPTextModel) -> str:
    """Which of `TEXT_CONTEXTS` an encoder made by `make_text_encoder` (and trained) has, read from its weights."""
    first, *rest = _self_attention(encoder)
    if not first.k_proj.weight[:, : POSITION_CODE.start].any() and first.k_proj.weight.any():
        return "previous"  # keys that read only the position code: `_look_one_back`
    return "word" if not any(a.out_proj.weight.any() for a in (first, *rest)) else "causal"


def trainable_text_encoder(encoder: CLIPTextModel) -> CLIPTextModel:
    """The encoder's parameters trainable, except what keeps its context (`text_context`): a zeroed
    self-attention, and the first layer's look-one-back queries, keys, layer norm and position code
    (gradient hooks keep the code's dims of the word and position embeddings as they are)."""
    context = text_context(encoder)
    encoder.requires_grad_(True)
    attentions = _self_attention(encoder)
    for attention in attentions:
        if not attention.out_proj.weight.any() and not (context == "previous" and attention is attentions[0]):
            attention.requires_grad_(False)
    if context == "previous":
        attentions[0].q_proj.requires_grad_(False), attentions[0].k_proj.requires_grad_(False)
        encoder.encoder.layers[0].layer_norm1.requires_grad_(False)
        keep = torch.ones(TEXT_DIM)
        keep[POSITION_CODE] = 0
        for weight in (encoder.get_input_embeddings().weight, encoder.embeddings.position_embedding.weight):
            weight.register_hook(lambda grad: grad * keep)
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
