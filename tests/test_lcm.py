"""Latent-consistency models: sampling as diffusers' LCM pipeline, InfEdit on them, the LCM
option's errors, and the toy distillation (runs, resumes, loads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.denoiser import prompt_denoiser_for
from diffedit.families import adapter_for
from diffedit.jobs import generate_images, invert_image
from diffedit.models import load_model
from diffedit.plan import plan_job, plan_of_record
from diffedit.sampling import sample
from lab.testing import save_tiny_pipeline, tiny_lcm_pipeline


@pytest.fixture(scope="module")
def lcm():
    pipe = tiny_lcm_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter_for(pipe, "sd1")


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcm") / "tiny-lcm"
    tiny_lcm_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("steps", [1, 4])
def test_consistency_sampling_matches_diffusers_lcm_pipeline(lcm, steps):
    pipe, model = lcm
    assert model.consistency and model.guidance_embedded
    reference = pipe("a red circle", num_inference_steps=steps, guidance_scale=8.5, height=32, width=32,
                     generator=torch.Generator().manual_seed(3), output_type="latent").images
    denoise = prompt_denoiser_for(model, ["a red circle"], 8.5, 32, 32)
    gen = torch.Generator().manual_seed(3)
    draw = lambda: torch.randn((1, 4, 16, 16), generator=gen)  # noqa: E731
    ours = sample(denoise, draw(), model.schedule(steps, 32, 32), refresh=True, noise=lambda i: draw())
    assert denoise.calls == steps  # the scale is an input: no unconditional branch
    # LCMScheduler's boundary weight c_skip (< 1e-5 at these timesteps) is the only difference
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()
    # the guidance scale matters: it goes into the network, not into CFG
    other = sample(prompt_denoiser_for(model, ["a red circle"], 2.0, 32, 32), draw(),
                   model.schedule(steps, 32, 32), refresh=True, noise=lambda i: draw())
    assert not torch.allclose(other, ours)


def test_lcm_folder_loads_with_its_grid(lcm_folder):
    model = load_model(lcm_folder, device="cpu")
    assert model.name == "sd1" and model.consistency
    assert model.schedule(4, 32, 32).t == (999.0, 759.0, 499.0, 259.0)
    model.use_lcm_grid(20)  # another distillation grid: steps picked from 20 timesteps
    assert model.pipe.scheduler.config.original_inference_steps == 20
    assert model.schedule(4, 32, 32).t != (999.0, 759.0, 499.0, 259.0)
    model.use_lcm_grid(None)
    assert model.schedule(4, 32, 32).t == (999.0, 759.0, 499.0, 259.0)
    image, result = generate_images(model, ["a red circle"], [0], steps=4, guidance_scale=8.5)[0]
    assert result["nfe"] == 4 and image.size == (32, 32)


def test_lcm_option_errors(cli, lcm_folder, tiny_folder, tmp_path):
    code, _, err = cli("generate", "a red circle", "-m", tiny_folder("sd1"), "--lcm-original-steps", "20",
                       "-n", "2", "-o", tmp_path / "x.png")
    assert code != 0 and "--lcm-original-steps applies to latent-consistency models only" in err
    assert "DDIMScheduler" in err and not (tmp_path / "x.png").exists()
    code, _, err = cli("generate", "a red circle", "-m", lcm_folder, "--eta", "0.5", "-n", "2",
                       "-o", tmp_path / "x.png")
    assert code != 0 and "--eta does not apply to latent-consistency models" in err
    code, _, err = cli("generate", "a red circle", "-m", lcm_folder, "-n", "60", "-o", tmp_path / "x.png")
    assert code != 0 and "--steps 60" in err and not (tmp_path / "x.png").exists()
    code, _, err = cli("generate", "a red circle", "-m", lcm_folder, "-n", "4", "--guidance", "cfgpp", "-g", "0.5",
                       "-o", tmp_path / "x.png")
    assert code != 0 and "CFG++ needs an unconditional branch" in err
    code, out, err = cli("generate", "a red circle", "-m", lcm_folder, "-n", "4", "--lcm-original-steps", "20",
                         "-W", "32", "-H", "32", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert Image.open(tmp_path / "x.png").size == (32, 32)


def test_infedit_on_an_lcm_reproduces_the_source_and_edits(lcm, tmp_path):
    _, model = lcm
    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 8:20] = (220, 20, 20)
    path = tmp_path / "square.png"
    Image.fromarray(a).save(path)
    record, result = invert_image(model, str(path), plan_job(model, engine="infedit", steps=4), prompt="a red square")
    assert result["latent_max_abs"] <= 1e-4 and result["nfe"] == 4
    from diffedit.jobs import edit_record

    edited, info = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True))
    assert info["nfe"] == 4  # source, target, layout: one batched forward per step, no CFG branch
    assert np.abs(np.asarray(edited).astype(int) - np.asarray(record_image(model, record))).max() > 0


def record_image(model, record):
    from diffedit.images import to_pil

    return to_pil(model.decode(record.tensors["latent"]))


def test_distillation_resumes_exactly_and_saves_an_lcm(tmp_path):
    from lab.toy.lcm import DistillConfig, distill

    teacher = save_tiny_pipeline("sd1", tmp_path / "teacher")
    config = DistillConfig(steps=4, batch=2, dataset=16, checkpoint_every=2, cond_dim=16)
    ticks = []
    distill(teacher, tmp_path / "a", tmp_path / "work-a", config, lambda *t: ticks.append(t))
    assert [t[1] for t in ticks if t[0] == "lcm"] == [1, 2, 3, 4]
    # interrupted after 2 steps (the checkpoint), then resumed: the same model
    half = DistillConfig(**{**config.__dict__, "steps": 2})
    distill(teacher, tmp_path / "b0", tmp_path / "work-b", half, lambda *t: None)
    distill(teacher, tmp_path / "b", tmp_path / "work-b", config, lambda *t: None)
    a, b = load_model(tmp_path / "a", device="cpu"), load_model(tmp_path / "b", device="cpu")
    assert a.consistency and a.guidance_embedded
    for p, q in zip(a.network.parameters(), b.network.parameters()):
        assert torch.equal(p, q)
    base = dict(load_model(teacher, device="cpu").network.named_parameters())
    moved = sum(float((p.detach() - base[n].detach()).abs().sum()) for n, p in a.network.named_parameters()
                if n in base)
    assert moved > 0  # the student left the teacher


def test_shipped_toy_lcm_draws_in_four_steps():
    """The distilled toy LCM loads with diffusers' LCM pipeline and, in 4 consistency steps, draws
    what it is asked (by the checker); its teacher at 2 DDIM steps mostly fails (8 % right in
    `diffedit bench lcm`, where the LCM at 2 steps gets 88 %)."""
    from diffusers import LatentConsistencyModelPipeline

    from diffedit.models import DEFAULT_MODEL, TOY_LCM
    from lab.toy.quality import generate_batch, judge

    pipe = LatentConsistencyModelPipeline.from_pretrained(TOY_LCM)
    assert pipe.unet.config.time_cond_proj_dim == 64
    assert sum(p.stat().st_size for p in TOY_LCM.rglob("*") if p.is_file()) <= 20 * 2**20
    prompts = [("a red circle on a white background", "circle", "red"),
               ("a blue square on a white background", "square", "blue")]
    batch = [(p, s, c, seed) for p, s, c in prompts for seed in (1, 2, 3)]
    lcm = load_model(TOY_LCM, device="cpu")
    images = generate_batch(lcm, [b[0] for b in batch], [b[3] for b in batch], steps=4, guidance_scale=5.0)
    assert all(all(judge(i, s, c)) for i, (_, s, c, _) in zip(images, batch))
    teacher = load_model(DEFAULT_MODEL, device="cpu")
    images = generate_batch(teacher, [b[0] for b in batch], [b[3] for b in batch], steps=2, guidance_scale=5.0)
    assert sum(all(judge(i, s, c)) for i, (_, s, c, _) in zip(images, batch)) <= 3
