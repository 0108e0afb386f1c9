"""The shipped toy flow model (SD3-style MMDiT): loads with diffusers, follows prompts by the
checker, and the exact engines reconstruct on it."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from diffedit.denoiser import prompt_denoiser_for
from diffedit.jobs import invert_image
from diffedit.models import TOY_FLOW, load_model
from diffedit.plan import plan_job
from diffedit.sampling import sample
from diffedit.toy.shapes import Obj, caption, make_scene
from lab.toy.flow import (
    MAX_TOKENS,
    ZERO_TOKENS,
    CaptionCache,
    SinkAttention,
    make_tokenizer,
    make_transformer,
    text_conditioning,
)
from lab.toy.quality import generate_batch, judge

GUIDANCE = 5.0


@pytest.fixture(scope="module")
def flow():
    return load_model(TOY_FLOW, device="cpu")


def test_loads_with_diffusers_and_is_small():
    pipe = StableDiffusion3Pipeline.from_pretrained(TOY_FLOW, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.patch_size == 2
    size = sum(p.stat().st_size for p in TOY_FLOW.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not list(TOY_FLOW.rglob("*.bin"))


def test_training_attention_equals_diffusers_over_the_zero_tokens():
    """Training attends to one zero "T5" token with its logit raised by log 256; in float32 that is
    diffusers' joint attention over the pipeline's 256 zero tokens, through every block."""
    torch.manual_seed(0)
    net = make_transformer()
    with torch.no_grad():  # off the adaLN-Zero start, so every path carries signal
        for p in net.parameters():
            p.normal_(0, 0.05)
    z, clip, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 32, 128), torch.randn(2, 128)
    zeros, t = torch.zeros(2, ZERO_TOKENS, 128), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        reference = net(z, encoder_hidden_states=torch.cat([clip, zeros], 1), pooled_projections=pooled,
                        timestep=t).sample
        net.set_attn_processor(SinkAttention(ZERO_TOKENS))
        ours = net(z, encoder_hidden_states=torch.cat([clip, zeros[:, :1]], 1), pooled_projections=pooled,
                   timestep=t).sample
    assert reference.abs().max() > 0.1
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_the_longest_caption_fits_the_tokenizer():
    longest = caption([Obj("triangle", "purple", (0, 0), 1), Obj("triangle", "orange", (0, 0), 1),
                       Obj("triangle", "yellow", (0, 0), 1)], ("white", "beige"))
    tokenizer = make_tokenizer()
    ids = tokenizer(longest).input_ids
    assert len(ids) <= MAX_TOKENS and ids[-1] == tokenizer.eos_token_id


def test_caption_cache_equals_encoding_each_batch(flow):
    """Texts cached by one batch and new ones in the next come back as encoding that batch gives (to
    float rounding: a text's numbers differ by ~1e-7 with the batch it was encoded in)."""
    captions = [make_scene(seed).caption for seed in range(6)]
    cache = CaptionCache(flow.pipe)
    cache([captions[3], "", captions[0]])
    texts = [captions[3], "", captions[5], captions[0], captions[5]]
    with torch.no_grad():
        reference = text_conditioning(flow.pipe, texts)
    for ours, theirs in zip(cache(texts), reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert len(cache.rows) == 4


def test_our_sampler_is_diffusers_pipeline(flow):
    """Euler sampling with CFG equals StableDiffusion3Pipeline's on the shipped weights (its 256
    zero "T5" tokens included: the model was trained for them)."""
    prompt = "a red circle on a white background"
    reference = flow.pipe(prompt, height=64, width=64, num_inference_steps=8, guidance_scale=GUIDANCE,
                          generator=torch.Generator().manual_seed(4), output_type="latent").images
    denoise = prompt_denoiser_for(flow, [prompt], GUIDANCE, 64, 64)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    ours = sample(denoise, x, flow.schedule(8, 64, 64))
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_draws_what_it_is_asked(flow):
    """Colours are right; shapes on 95 % of 200 prompts (samples/toy-flow/README.md), stars least
    often on the models before, so this guards what the model does: every colour, circles, squares and
    triangles on every seed, 10 of the 12 shapes."""
    prompts = [("a red circle on a white background", "circle", "red"),
               ("a blue square on a white background", "square", "blue"),
               ("a green triangle on a grey background", "triangle", "green"),
               ("a yellow star on a black background", "star", "yellow")]
    batch = [(p, s, c, seed) for p, s, c in prompts for seed in (1, 2, 3)]
    images = generate_batch(flow, [b[0] for b in batch], [b[3] for b in batch], steps=25, guidance_scale=GUIDANCE)
    judged = [judge(image, shape, colour) for image, (_, shape, colour, _) in zip(images, batch)]
    assert all(colour for _, colour in judged), judged
    assert all(shape for shape, _ in judged[:9]), judged[:9]
    assert sum(shape for shape, _ in judged) >= 10, judged


@pytest.mark.parametrize("engine", ["ddpm-ef", "bdia", "flowedit"])
def test_exact_engines_on_the_toy_flow_model(flow, engine):
    scene = make_scene(10**8 + 5)
    params = {"n_max": 14} if engine == "flowedit" else None  # the paper's 33 of 50 steps, at 20
    _, result = invert_image(flow, Image.fromarray(scene.image), plan_job(flow, engine=engine, steps=20, params=params), prompt=scene.caption)
    assert result["latent_max_abs"] <= 1e-4
    assert result["psnr"] == pytest.approx(result["vae_psnr"], abs=0.01)


def test_fine_tuning_starts_from_the_given_model(tmp_path):
    """`toy train --flow --init-from`: the transformer starts from the saved model's weights and its
    frozen text encoders are kept (at learning rate 0 one step changes nothing)."""
    from lab.toy.flow import FlowTrainConfig, train

    out = tmp_path / "tuned"
    train(out, tmp_path / "work", FlowTrainConfig(dataset=8, steps=1, lr=0.0), lambda *a: None,
          vae_from=TOY_FLOW, init_from=TOY_FLOW)
    tuned = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    shipped = StableDiffusion3Pipeline.from_pretrained(TOY_FLOW, text_encoder_3=None, tokenizer_3=None)
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        for (name, a), b in zip(getattr(tuned, part).state_dict().items(), getattr(shipped, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name}"
