"""The one math against diffusers' own pipelines and schedulers, on every tiny family."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ
from diffusers import DDIMInverseScheduler

from diffedit.denoiser import branch_denoiser, prompt_denoiser
from diffedit.engines import Run
from diffedit.guidance.cfg import CFG
from diffedit.inversion import get_engine
from diffedit.sampling import churn, initial_noise, invert, sample

H = W = 32


def diffusers_latents(pipe, family, prompt, steps, scale, seed):
    kwargs = dict(num_inference_steps=steps, guidance_scale=scale, height=H, width=W,
                  output_type="latent", generator=torch.Generator().manual_seed(seed))
    if family in SEQ:
        kwargs["max_sequence_length"] = SEQ[family]
    latents = pipe(prompt, **kwargs).images
    if family == "flux":
        latents = pipe._unpack_latents(latents, H, W, pipe.vae_scale_factor)
    return latents


def test_generate_matches_diffusers(tiny, family):
    pipe, model = tiny(family)
    steps, scale, seed = 6, 5.0, 11
    expected = diffusers_latents(pipe, family, "a red cat on a house", steps, scale, seed)
    denoise = branch_denoiser(model, "a red cat on a house", scale, H, W)
    x = initial_noise(model.latent_shape(1, H, W), [seed], model.device)
    ours = sample(denoise, x, model.schedule(steps, H, W))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-4
    # CFG branches run in one batched forward per step (Flux takes guidance as an input: one branch)
    assert denoise.calls == steps


def test_negative_prompt_matches_diffusers(tiny):
    pipe, model = tiny("sd1")
    expected = pipe("a cat", negative_prompt="a dog", num_inference_steps=4, guidance_scale=3.0, height=H,
                    width=W, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    denoise = prompt_denoiser(model, ["a cat"], CFG(3.0), H, W, negative_prompt="a dog")
    x = initial_noise(model.latent_shape(1, H, W), [2], model.device)
    assert (sample(denoise, x, model.schedule(4, H, W)) - expected).abs().max() <= 1e-4


def test_ddim_inversion_matches_diffusers_inverse_scheduler(tiny):
    pipe, model = tiny("sd1")
    steps = 10
    z0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    denoise = branch_denoiser(model, "a red square", 1.0, H, W)
    ours = invert(denoise, z0, model.schedule(steps, H, W))

    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    text = pipe.encode_prompt("a red square", "cpu", 1, False)[0]
    x, reference = z0, [z0]
    with torch.no_grad():
        for t in inverse.timesteps:
            eps = pipe.unet(x, t, encoder_hidden_states=text).sample
            x = inverse.step(eps, t, x).prev_sample
            reference.append(x)
    assert len(ours) == len(reference) == steps + 1
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert (a - b).abs().max() <= 1e-5, f"step {i}"


def round_trip_error(model, steps, z0, prompt="a red square"):
    run_denoise = branch_denoiser(model, prompt, 1.0, H, W)
    engine = get_engine("ddim")
    run = Run(model, model.schedule(steps, H, W), run_denoise, run_denoise, engine.Params())
    z_rec = engine.edit(run, engine.invert(run, z0))
    return float((z_rec - z0).abs().max()), run.nfe


def test_ddim_round_trip_every_family(tiny, family):
    _, model = tiny(family)
    pixels = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z0 = model.encode_image(pixels)
    error, nfe = round_trip_error(model, 20, z0)
    assert nfe == 40
    # random weights make the error large, but it must be real (not zero) and finite
    assert 0 < error < float("inf")


def test_ddim_round_trip_error_falls_with_steps(tiny):
    _, model = tiny("sd1")
    z0 = model.encode_image(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    coarse, _ = round_trip_error(model, 10, z0)
    fine, _ = round_trip_error(model, 50, z0)
    assert fine < coarse


@pytest.mark.parametrize("a_from,s_from,a_to,s_to", [(0.3, 0.954, 0.6, 0.8), (0.2, 0.8, 0.5, 0.5)])
def test_churn_matches_ddim_sigma_and_vanishes_at_eta_zero(a_from, s_from, a_to, s_to):
    assert churn(a_from, s_from, a_to, s_to, 0.0) == 0.0
    c = churn(a_from, s_from, a_to, s_to, 1.0)
    if abs(a_from**2 + s_from**2 - 1) < 1e-2 and abs(a_to**2 + s_to**2 - 1) < 1e-2:  # VP: DDIM's sigma
        ab_t, ab_prev = a_from**2, a_to**2
        sigma = ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        assert c == pytest.approx(sigma, rel=2e-2)
    assert 0 < c <= s_to


def test_stochastic_step_matches_diffusers_ddim_eta(tiny):
    """eta = 1 with diffusers' own noise draws equals DDIMScheduler with eta = 1."""
    pipe, model = tiny("sd1")
    steps, seed = 5, 4
    gen = torch.Generator().manual_seed(seed)
    expected = pipe("a cat", num_inference_steps=steps, guidance_scale=1.0, eta=1.0, height=H, width=W,
                    output_type="latent", generator=gen).images
    # diffusers draws the initial latents first, then one variance noise per step from the same generator
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(model.latent_shape(1, H, W), generator=gen)
    denoise = branch_denoiser(model, "a cat", 1.0, H, W)
    ours = sample(denoise, x, model.schedule(steps, H, W), eta=1.0,
                  noise=lambda i: torch.randn(x.shape, generator=gen))
    assert (ours - expected).abs().max() <= 1e-4


def test_half_precision_overflow_stops_at_the_step_that_overflowed(tmp_path, cli):
    from lab.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    with torch.no_grad():  # activations past fp16's 65504 after the first convolution; fine in fp32
        pipe.unet.conv_in.weight.mul_(1e6)
    pipe.save_pretrained(tmp_path / "hot")
    args = ["generate", "a red cat", "-n", 5, "-m", tmp_path / "hot", "--device", "cpu", "-q"]
    code, _, err = cli(*args, "--dtype", "fp16", "-o", tmp_path / "half.png")
    assert code == 1 and "step 1 of 5: the network returned NaN/Inf in torch.float16" in err
    assert not (tmp_path / "half.png").exists()
    code, _, err = cli(*args, "--dtype", "fp32", "-o", tmp_path / "full.png")
    assert code == 0, err
