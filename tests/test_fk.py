"""Feynman-Kac steering: K = 1 is the plain stochastic sampler; resampling; failing rewards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffedit.denoiser import prompt_denoiser
from diffedit.errors import DiffeditError, UsageError
from diffedit.guidance.cfg import CFG
from diffedit.guidance.fk import FKConfig, load_reward, steer
from diffedit.jobs import generate_image
from diffedit.sampling import sample

H = W = 32


def setup(model, k, steps=10):
    denoise = prompt_denoiser(model, ["a red cat"] * k, CFG(3.0), H, W)
    return denoise, model.schedule(steps, H, W), model.latent_shape(1, H, W)


def test_one_particle_is_the_plain_stochastic_sampler(tiny):
    _, model = tiny("sd1")
    denoise, schedule, shape = setup(model, 1)
    ours, _, _ = steer(denoise, schedule, shape, 7, load_reward("saturation"), "a red cat", model.decode,
                       FKConfig(particles=1), model.device)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    plain = sample(prompt_denoiser(model, ["a red cat"], CFG(3.0), H, W), x, schedule, eta=1.0,
                   noise=lambda i: torch.randn(shape, generator=gen))
    assert torch.equal(ours, plain)


def test_on_an_lcm_particles_take_consistency_steps():
    """On a latent-consistency model each particle is the plain consistency sampler (all-fresh noise
    per step), not the churned ancestral step."""
    from diffedit.families import adapter_for
    from lab.testing import tiny_lcm_pipeline

    model = adapter_for(tiny_lcm_pipeline(), "sd1")
    shape, schedule = model.latent_shape(1, H, W), model.schedule(4, H, W)
    denoise = prompt_denoiser(model, ["a red cat"], CFG(1.0), H, W)
    ours, _, _ = steer(denoise, schedule, shape, 7, load_reward("saturation"), "a red cat", model.decode,
                       FKConfig(particles=1), model.device, refresh=model.consistency)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    plain = sample(prompt_denoiser(model, ["a red cat"], CFG(1.0), H, W), x, schedule, refresh=True,
                   noise=lambda i: torch.randn(shape, generator=gen))
    assert torch.equal(ours, plain)
    churned, _, _ = steer(denoise, schedule, shape, 7, load_reward("saturation"), "a red cat", model.decode,
                          FKConfig(particles=1), model.device)
    assert not torch.allclose(churned, plain)


def test_generate_with_one_particle_equals_eta_one(tiny):
    _, model = tiny("sd1")
    a, _ = generate_image(model, "a red cat", seed=4, steps=8, width=W, height=H, eta=1.0)
    b, _ = generate_image(model, "a red cat", seed=4, steps=8, width=W, height=H, eta=1.0, fk=FKConfig(particles=1))
    assert (np.asarray(a) == np.asarray(b)).all()


def favour_first(images, prompt):
    """A reward that strongly prefers particle 0: resampling must copy it everywhere."""
    return torch.tensor([10.0] + [0.0] * (images.shape[0] - 1))


def test_resampling_follows_the_reward(tiny):
    _, model = tiny("sd1")
    denoise, schedule, shape = setup(model, 4)
    latents, rewards, stats = steer(denoise, schedule, shape, 0, favour_first, "", model.decode,
                                    FKConfig(particles=4, every=2), model.device)
    assert stats["resamples"] >= 1
    # after resampling every particle descends from the same one: they agree on the early structure
    assert latents.shape[0] == 4 and torch.isfinite(latents).all()


def test_best_particle_has_the_highest_reward(tiny):
    _, model = tiny("sd1")
    _, result = generate_image(model, "a red cat", seed=2, steps=10, width=W, height=H,
                               fk=FKConfig(particles=3, every=2), reward="brightness")
    assert result["reward"] == max(result["rewards"]) and result["particles"] == 3


def raises(images, prompt):
    raise ValueError("reward server is down")


def nan_for_first(images, prompt):
    r = images.mean((1, 2, 3)).clone()
    r[0] = math.nan
    return r


def all_nan(images, prompt):
    return torch.full((images.shape[0],), math.nan)


def test_reward_that_raises_fails_clearly(tiny):
    _, model = tiny("sd1")
    denoise, schedule, shape = setup(model, 2)
    with pytest.raises(DiffeditError, match="FK reward failed: ValueError: reward server is down"):
        steer(denoise, schedule, shape, 0, raises, "", model.decode, FKConfig(particles=2, every=2), model.device)


def test_nan_reward_drops_that_particle_and_all_nan_fails(tiny):
    _, model = tiny("sd1")
    denoise, schedule, shape = setup(model, 3)
    _, rewards, _ = steer(denoise, schedule, shape, 0, nan_for_first, "", model.decode,
                          FKConfig(particles=3, every=2, ess_threshold=1.0), model.device)
    # particle 0 had weight 0 at every resampling, so none of its copies survive with a NaN reward
    assert torch.isfinite(rewards[1:]).all()
    denoise, schedule, shape = setup(model, 3)
    with pytest.raises(DiffeditError, match="every particle's reward is NaN"):
        steer(denoise, schedule, shape, 0, all_nan, "", model.decode, FKConfig(particles=3, every=2), model.device)


@pytest.mark.parametrize("config,message", [
    (FKConfig(particles=0), "--fk-particles 0"),
    (FKConfig(potential="min"), "--fk-potential 'min'"),
    (FKConfig(eta=0.0), "--eta 0.0"),
])
def test_bad_fk_options(config, message):
    with pytest.raises(UsageError, match=message):
        config.check()


def test_reward_specs():
    assert load_reward("brightness")(torch.ones(2, 3, 4, 4), "").tolist() == [1.0, 1.0]
    assert load_reward("math:sqrt") is math.sqrt
    with pytest.raises(UsageError, match="cannot import"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="module:function"):
        load_reward("nonsense")
