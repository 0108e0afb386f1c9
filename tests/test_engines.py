"""Exact inversion engines (edit-friendly DDPM, BDIA) on every family, against diffusers' LEDITS++."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LEditsPPPipelineStableDiffusion, LEditsPPPipelineStableDiffusionXL
from PIL import Image

from diffedit.denoiser import branch_denoiser
from diffedit.engines import Run
from diffedit.errors import UsageError
from diffedit.images import to_tensor
from diffedit.inversion import engine_names, get_engine
from diffedit.inversion.bdia import BDIA, first_level
from diffedit.inversion.ddpm_ef import default_skip

H = W = 32


def resolved(engine, params, steps):
    """The engine and its checked parameters, as a plan resolves them."""
    eng = get_engine(engine)
    return eng, eng.resolve(eng.Params.from_options(engine, params), steps, None), steps


def round_trip(model, engine, steps, scale=3.0, params=None, prompt="a red cat"):
    z0 = model.encode_image(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    eng, params, steps = resolved(engine, params, steps)
    denoise = branch_denoiser(model, prompt, scale, H, W)
    run = Run(model, model.schedule(steps, H, W), denoise, denoise, params, seeds=(0,))
    tensors = eng.invert(run, z0)
    return float((eng.edit(run, tensors) - z0).abs().max()), tensors, run


def test_engines_registered():
    assert {"ddim", "ddpm-ef", "bdia"} <= set(engine_names())


@pytest.mark.parametrize("engine", ["ddpm-ef", "bdia"])
def test_exact_engines_reconstruct_every_family(tiny, family, engine):
    _, model = tiny(family)
    exact, _, run = round_trip(model, engine, 20)
    ddim, _, _ = round_trip(model, "ddim", 20)
    assert exact <= 1e-4
    assert ddim > 100 * max(exact, 1e-6)  # DDIM's error is measurably larger
    # inversion + reconstruction, CFG batched; BDIA inverts the last 80 % of the steps and samples
    # from its stored pair of states, edit-friendly DDPM edits from the paper's default skip
    bdia_steps = 20 - first_level(20, 0.8)
    assert run.nfe == (2 * bdia_steps - 1 if engine == "bdia" else 2 * 20 - default_skip(20))


def test_bdia_strength_is_an_inversion_option(tiny):
    _, model = tiny("sd1")
    error, tensors, run = round_trip(model, "bdia", 20, params={"strength": 1.0})
    assert error <= 1e-4 and int(tensors["start"]) == 0 and run.nfe == 2 * 20 - 1  # from pure noise
    recorded = {**tensors, "latent": tensors["noise"].float()}
    BDIA().check_record(recorded, 20, run.params, "rec")
    with pytest.raises(UsageError, match="rec: the inversion started at level 0, but 20 steps at strength 0.5 start "
                                         "at 10; --strength is an inversion option"):
        BDIA().check_record(recorded, 20, replace(run.params, strength=0.5), "rec")


def test_ddpm_ef_skip_starts_late_and_stays_exact(tiny):
    _, model = tiny("sd1")
    error, tensors, run = round_trip(model, "ddpm-ef", 20, params={"skip": 8})
    assert error <= 1e-4
    assert run.target.calls == 20 + 12  # inversion evaluates all 20 levels; the edit only 12


class IntIndexDDIM(DDIMScheduler):
    """diffusers 0.42.1's LEDITS++ (SD) indexes alphas with a float tensor, which torch 2.13 rejects."""

    def add_noise(self, original, noise, timesteps):
        return super().add_noise(original, noise, timesteps.long())


def ledits(tiny, family):
    base, model = tiny(family)
    cls = LEditsPPPipelineStableDiffusion if family == "sd1" else LEditsPPPipelineStableDiffusionXL
    parts = {k: v for k, v in base.components.items() if k in cls.__init__.__code__.co_varnames}
    parts["scheduler"] = IntIndexDDIM.from_config(base.scheduler.config)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


@pytest.mark.parametrize("family,prompt,extra", [
    # LEDITS++ (SD) inverts unconditionally when the source prompt is empty: the same computation
    ("sd1", "", {}),
    # LEDITS++ XL zeroes its last noise maps by default (num_zero_noise_steps=3); turned off here
    ("sdxl", "a red cat", {"num_zero_noise_steps": 0}),
])
def test_ddpm_ef_matches_diffusers_ledits_pp(tiny, family, prompt, extra):
    pipe, model = ledits(tiny, family)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    steps, scale = 10, 3.5
    pipe.invert(image=image, source_prompt=prompt, source_guidance_scale=scale, num_inversion_steps=steps,
                skip=0.0, generator=torch.Generator().manual_seed(0), **extra)
    z0 = model.encode_image(to_tensor(image))
    eng, params, _ = resolved("ddpm-ef", None, steps)
    denoise = branch_denoiser(model, prompt, scale, H, W)
    ours = eng.invert(Run(model, model.schedule(steps, H, W), denoise, denoise, params, seeds=(0,)), z0)
    theirs = pipe.zs.reshape(ours["zs"].shape)
    assert (pipe.init_latents - ours["xs"][0]).abs().max() <= 1e-5
    # noise maps: equal up to float32 rounding of diffusers' own arithmetic, relative to their size
    assert ((theirs - ours["zs"]).abs().max() / theirs.abs().max()) <= 1e-4


@pytest.mark.parametrize("engine,params,steps,message", [
    ("ddpm-ef", {"skip": 20}, 20, "--skip 20"),
    ("ddpm-ef", {"skip": -1}, 20, "--skip -1"),
    ("bdia", {"gamma": 0.0}, 20, "--gamma 0.0"),
    ("bdia", {"gamma": 1.5}, 20, "--gamma 1.5"),
    ("bdia", {"strength": 0.0}, 20, "--strength 0.0"),
    ("bdia", {"strength": 0.1}, 10, "at least 2 steps"),
    ("ddim", {"gamma": 0.9}, 20, "--gamma does not apply to engine ddim"),
    ("ddpm-ef", {"gamma": 0.9}, 20, "--gamma does not apply to engine ddpm-ef"),
])
def test_bad_engine_parameters(engine, params, steps, message):
    with pytest.raises(UsageError, match=message):
        resolved(engine, params, steps)


def test_cli_exact_inversion_psnr_equals_vae(cli, tmp_path, tiny_folder):
    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 10:24] = (30, 60, 220)
    Image.fromarray(a).save(tmp_path / "in.png")
    for engine in ("bdia", "ddpm-ef"):
        code, out, err = cli("invert", tmp_path / "in.png", "-m", tiny_folder("sd1"), "-e", engine, "-n", 10,
                             "-o", tmp_path / f"{engine}.inv.safetensors", "--json", "-q")
        assert code == 0, err
        result = json.loads(out)
        assert result["latent_max_abs"] <= 1e-4
        assert result["psnr"] == pytest.approx(result["vae_psnr"], abs=0.05)


def test_cli_edit_engines_and_reuse_record(cli, tmp_path, tiny_folder):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "in.png")
    model = tiny_folder("sd1")
    code, out, err = cli("edit", tmp_path / "in.png", "-s", "a red cat", "-t", "a blue cat", "-e", "ddpm-ef",
                         "-n", 6, "--skip", 2, "-m", model, "-o", tmp_path / "e.png", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["nfe"] == 6 + 4
    record = tmp_path / "in.inv.safetensors"
    assert cli("invert", tmp_path / "in.png", "-e", "bdia", "-n", 5, "-m", model, "-q")[0] == 0
    for target in ("a blue cat", "a green dog"):
        code, out, err = cli("edit", "--from", record, "-t", target, "-o", tmp_path / f"{target}.png", "-q")
        assert code == 0, err
    code, _, err = cli("edit", "--from", record, "-t", "x", "--skip", 1, "-o", tmp_path / "bad.png", "-q")
    assert code == 2 and "--skip does not apply to engine bdia" in err
    assert not (tmp_path / "bad.png").exists()
