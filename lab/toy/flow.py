"""The toy flow model: an SD3-style (MMDiT) `StableDiffusion3Pipeline` trained with flow matching.

It takes a toy SD model's VAE as it is (`--vae-from`: 64x64 images <-> 16x16x4 latents, shift 0)
and has two frozen, randomly initialised CLIP text encoders with projections (SD3's CLIP-L/CLIP-G
pair, width 64 each: joint text width 128, pooled 128) and no T5. Without T5, diffusers' pipeline
feeds `max_sequence_length` (256) zero vectors in its place; they stay identical through every
block (no positions on text tokens), so training attends to one of them with its logit raised by
log 256 instead, which is exactly the same function at a third of the cost. Inference runs
diffusers' unchanged attention on all 256.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffedit.tokenizers import clip_word_tokenizer
from diffedit.toy.shapes import VOCAB, user_caption
from lab.toy import model as toy
from lab.toy.train import encode_dataset, fit_denoiser

ZERO_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero "T5" tokens
# CLIP tokens per prompt: the longest caption of the shapes world has 19 with start and end. Every
# text token goes through every joint block, so 20 rather than the toy SD model's 32 (85 tokens in
# all per image rather than 97) saves training time.
MAX_TOKENS = 20


@dataclass
class FlowTrainConfig:
    seed: int = 0
    dataset: int = 20_000
    steps: int = 12_000
    batch: int = 48
    lr: float = 8e-4
    warmup: int = 200
    ema: float = 0.999
    caption_dropout: float = 0.1
    user_captions: bool = True  # captions rewritten as people type them (`user_caption`), as the toy SD model learns
    checkpoint_every: int = 200


def make_transformer() -> SD3Transformer2DModel:
    net = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * toy.TEXT_DIM, caption_projection_dim=128,
        pooled_projection_dim=2 * toy.TEXT_DIM, pos_embed_max_size=32,
    )
    # adaLN-Zero (DiT): every block starts as the identity and the output at zero. A first run
    # with diffusers' default init drew blobs, not shapes, after 3200 steps (25 % right shapes).
    with torch.no_grad():
        for name, module in net.named_modules():
            if name == "proj_out" or name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")):
                module.weight.zero_()
                module.bias.zero_()
    return net


def make_tokenizer():
    return clip_word_tokenizer(VOCAB, model_max_length=MAX_TOKENS)


def make_text_encoder(tokenizer) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=toy.TEXT_DIM, intermediate_size=2 * toy.TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=toy.TEXT_DIM, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def assemble(vae, transformer, text_encoder, text_encoder_2, tokenizer, shift: float = 1.0):
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def load_vae(source: str | Path) -> AutoencoderKL:
    """The toy SD model's VAE in float32, with SD3's shift factor set (0: its latents are centred)."""
    vae = AutoencoderKL.from_pretrained(Path(source) / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


class SinkAttention:
    """SD3 joint attention where the last text token stands for `copies` identical tokens.

    Softmax over n equal keys gives each exp(l)/Z with Z counting them n times: one key with its
    logit raised by log n carries the same total weight and value, so outputs are unchanged.
    """

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], device=q.device)
        bias[-1] = self.log_copies
        # Written out rather than SDPA: under bf16 autocast on the CPU, SDPA's backward is several
        # times slower than these two matmuls at this sequence length (~100 tokens).
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
        out = scores.float().softmax(-1).to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        image, text = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def text_conditioning(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text tokens with ONE zero token standing for the 256, pooled) for `SinkAttention`."""
    text, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=1)
    return text, pooled


class CaptionCache:
    """`text_conditioning` of each caption, computed the first time a batch asks for it: the text
    encoders are frozen, and encoding every batch anew cost a tenth of a training step. Lazily, because
    the forms people type (`user_caption`) give 59 000 texts for 7 500 captions; each is encoded
    once, as it first comes up."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted(set(texts) - self.rows.keys())
        if new:
            with torch.no_grad():
                text, pooled = text_conditioning(self.pipe, new)
            self.rows.update({t: (text[i], pooled[i]) for i, t in enumerate(new)})
        return (torch.stack([self.rows[t][0] for t in texts]), torch.stack([self.rows[t][1] for t in texts]))


def train(out: Path, work: Path, config: FlowTrainConfig, tick, vae_from: str | Path = "samples/toy-sd",
          init_from: str | Path | None = None) -> dict:
    """Train the transformer with flow matching on the toy SD VAE's latents and save the pipeline.

    `init_from`, a saved toy flow model, fine-tunes it onto these latents instead of starting fresh:
    its frozen text encoders are kept and its transformer is the starting point (what it learned of
    words and layouts carries over; the patch embedding and output relearn the new latent space)."""
    torch.set_num_threads(2)
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    vae = load_vae(vae_from)
    start = None
    if init_from is None:
        text_encoder, text_encoder_2 = make_text_encoder(tokenizer), make_text_encoder(tokenizer)
    else:
        text_encoder, text_encoder_2 = (
            CLIPTextModelWithProjection.from_pretrained(Path(init_from) / part, dtype=torch.float32).eval().requires_grad_(False)
            for part in ("text_encoder", "text_encoder_2"))
        start = SD3Transformer2DModel.from_pretrained(Path(init_from) / "transformer", dtype=torch.float32).state_dict()

    def make_net():
        net = make_transformer()
        if start is not None:
            net.load_state_dict(start)
        return net

    pipe = assemble(vae, make_transformer(), text_encoder, text_encoder_2, tokenizer)
    latents, captions = encode_dataset(config, vae, vae.config.scaling_factor, work, tick)
    conditioning = CaptionCache(pipe)

    def loss(net, gen, z0, texts):
        text, pooled = conditioning(texts)
        t = torch.sigmoid(torch.randn(len(z0), generator=gen))  # logit-normal times, as SD3
        eps = torch.randn(z0.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls: 1.5x faster steps on this CPU
            pred = net(hidden_states=(1 - tt) * z0 + tt * eps, timestep=t * 1000, encoder_hidden_states=text,
                       pooled_projections=pooled).sample
        return (pred.float() - (eps - z0)).pow(2).mean()

    sink = SinkAttention(ZERO_TOKENS)
    transformer = fit_denoiser(config, make_net, lambda net: net.set_attn_processor(sink), loss, latents,
                               captions, config.steps, config.batch, config.lr, work / "transformer.ckpt",
                               "transformer", tick, rewrite=user_caption if config.user_captions else None)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
    # Sampled with SD3's timestep shift 3 (more of the steps at high noise, where layouts form):
    # on the 10 000-step model, 87 % right shapes against 84.5 % at shift 1 (samples/toy-flow/README.md).
    pipe = assemble(vae, transformer, text_encoder, text_encoder_2, tokenizer, shift=3.0)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    return {"config": asdict(config), "vae_from": str(vae_from), "init_from": init_from and str(init_from),
            "scaling_factor": vae.config.scaling_factor}

