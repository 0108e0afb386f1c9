"""`--fixed-point K`: inversion steps solved for the sampler's exact inverse (`sampling.unstep`).

The update's fixed point is checked on every tiny family's own sampling path (eps, v-prediction,
flow); convergence and the round trip on the shipped toy model, where a trained network makes the
fixed point meaningful; the option through the CLI and records.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import toy_round_trips

from diffedit.denoiser import branch_denoiser
from diffedit.models import DEFAULT_MODEL, load_model
from diffedit.records import load_record
from diffedit.sampling import initial_noise, invert, sample, unstep

H = W = 32
PROMPT = "a red cat on a house"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd3"])  # eps, v-prediction, flow
def test_the_true_level_is_the_fixed_point_of_every_step(tiny, family):
    """On a path `sample` took, each level is left where it is by `unstep` (given the level below
    it), and a perturbed level is pulled back towards it."""
    _, model = tiny(family)
    schedule = model.schedule(8, H, W)
    denoise = branch_denoiser(model, PROMPT, 3.0, H, W)
    levels = [initial_noise(model.latent_shape(1, H, W), [5], model.device)]
    sample(denoise, levels[0], schedule, callback=lambda i, x, x0: levels.append(x))
    with torch.inference_mode():
        for i in range(len(schedule)):
            back = unstep(levels[i + 1], levels[i], denoise(levels[i], schedule, i), schedule, i)
            scale = float(levels[i].abs().max())
            assert float((back - levels[i]).abs().max()) <= 1e-5 * scale, (i, scale)
            if schedule.a[i] > 0.1:  # (on pure noise the update keeps its guess)
                off = levels[i] + 0.05 * scale * torch.randn_like(levels[i])
                nearer = unstep(levels[i + 1], off, denoise(off, schedule, i), schedule, i)
                assert float((nearer - levels[i]).norm()) < float((off - levels[i]).norm()), i


def test_fixed_point_inversion_round_trips_closer_on_the_toy_model():
    """10 steps with 4 updates each come back closer on every scene than plain DDIM at 10 and at
    20 steps."""
    model = load_model(DEFAULT_MODEL, device="cpu")
    solved, calls = toy_round_trips(model, 10, fixed_point=4)
    assert calls == {10 * (1 + 4)}
    plain_10, _ = toy_round_trips(model, 10)
    plain_20, _ = toy_round_trips(model, 20)
    for ours, ten, twenty in zip(solved, plain_10, plain_20):
        assert ours < 0.5 * ten and ours < twenty, (solved, plain_10, plain_20)


def test_without_fixed_point_the_inversion_is_unchanged(tiny):
    """`fixed_point=0` is the plain inversion (the one that matches diffusers' inverse scheduler)."""
    _, model = tiny("sd1")
    z0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    schedule = model.schedule(6, H, W)
    plain = invert(branch_denoiser(model, PROMPT, 3.0, H, W), z0, schedule)
    again = invert(branch_denoiser(model, PROMPT, 3.0, H, W), z0, schedule, fixed_point=0)
    solved = invert(branch_denoiser(model, PROMPT, 3.0, H, W), z0, schedule, fixed_point=1)
    assert all(torch.equal(p, q) for p, q in zip(plain, again))
    assert float((solved[-1] - plain[-1]).abs().max()) > 1e-3


def test_cli_records_fixed_point_and_refuses_it_elsewhere(cli, tmp_path, tiny_folder):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    sd1, record = tiny_folder("sd1"), tmp_path / "fp.inv.safetensors"
    code, out, err = cli("invert", image, "-m", sd1, "--steps", 4, "-p", "a red square", "--fixed-point", 2,
                         "-o", record, "--json", "-q")
    assert code == 0, err
    assert load_record(record).meta["engine"] == {"name": "ddim", "solver": "ddim", "fixed_point": 2}
    assert json.loads(out)["nfe"] == 4 * 3 + 4  # inversion (1 + 2 per step), then the check's sampling
    code, _, err = cli("invert", image, "-m", sd1, "--steps", 4, "--fixed-point", 11, "-o",
                       tmp_path / "x.inv.safetensors", "-q")
    assert code == 2 and err.strip() == "error: --fixed-point 11: choose 0 to 10", err
    code, _, err = cli("invert", image, "-m", sd1, "--steps", 4, "--engine", "ddpm-ef", "--fixed-point", 1,
                       "-o", tmp_path / "y.inv.safetensors", "-q")
    assert code == 2 and "--fixed-point does not apply to engine ddpm-ef" in err
    code, _, err = cli("invert", image, "-m", sd1, "--steps", 4, "--solver", "dpmpp-2m", "--fixed-point", 1,
                       "-o", tmp_path / "z.inv.safetensors", "-q")
    assert code == 2 and err.startswith("error: --fixed-point applies to --solver ddim: a dpmpp-2m step"), err
    assert not any((tmp_path / f"{n}.inv.safetensors").exists() for n in "xyz")
