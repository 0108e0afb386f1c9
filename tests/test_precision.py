"""Half precision: the network in fp16/bf16, the integrator in fp32, VAE overflow upcast or reported."""

from __future__ import annotations

import json

import pytest
import torch

from diffedit.errors import DiffeditError
from diffedit.images import to_tensor
from diffedit.jobs import generate_image
from diffedit.models import load_model
from lab.testing import tiny_pipeline

# Stated tolerances on images in [-1, 1] (one 8-bit level is 2/255): fp16 within 2 levels everywhere;
# bf16 (8 bits of mantissa) within 0.02 on average and 0.15 at worst.
TOLERANCE = {"fp16": (2 * 2 / 255, 0.002), "bf16": (0.15, 0.02)}


def image(model, steps=10):
    img, _ = generate_image(model, "a red cat", seed=0, steps=steps)
    return to_tensor(img)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_stays_within_the_stated_tolerance(tiny_folder, family, dtype):
    folder = tiny_folder(family)
    full = image(load_model(folder, device="cpu", dtype="fp32"))
    half_model = load_model(folder, device="cpu", dtype=dtype)
    assert half_model.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    diff = (image(half_model) - full).abs()
    worst, mean = TOLERANCE[dtype]
    assert diff.max() <= worst and diff.mean() <= mean


def hot_vae_pipeline(path, force_upcast: bool):
    pipe = tiny_pipeline("sd1")
    with torch.no_grad():  # the decoder's first activations pass fp16's 65504; fp32 normalises them away
        pipe.vae.decoder.conv_in.weight.mul_(5e4)  # weights still fit in fp16
    pipe.save_pretrained(path, safe_serialization=True)
    config = path / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": force_upcast}))
    return path


def test_fp16_vae_overflow_is_upcast_to_a_correct_image(tmp_path):
    folder = hot_vae_pipeline(tmp_path / "upcast", force_upcast=True)
    full = image(load_model(folder, device="cpu", dtype="fp32"), steps=4)
    half = image(load_model(folder, device="cpu", dtype="fp16"), steps=4)
    assert torch.isfinite(half).all() and (half - full).abs().max() <= TOLERANCE["fp16"][0]


def test_fp16_vae_overflow_without_upcast_is_a_clear_error(tmp_path):
    folder = hot_vae_pipeline(tmp_path / "hot", force_upcast=False)
    with pytest.raises(DiffeditError, match="the VAE overflowed decoding in torch.float16"):
        image(load_model(folder, device="cpu", dtype="fp16"), steps=4)


def test_vae_tiling_round_trips_large_images_like_untiled(tmp_path, cli):
    from PIL import Image

    from diffedit.cli.common import load, reuse_models
    from diffedit.toy.shapes import make_scene

    Image.fromarray(make_scene(7, size=256).image).save(tmp_path / "big.png")
    psnrs = {}
    for flag in ([], ["--vae-tiling"]):
        code, out, err = cli("invert", tmp_path / "big.png", "-n", 2, "-o", tmp_path / f"r{len(flag)}.st", "--json",
                             "-q", *flag)
        assert code == 0, err
        psnrs[bool(flag)] = json.loads(out)["vae_psnr"]
    # the toy VAE tiles at its 64-px training size (SD tiles at 512 px), so the blended seams are a
    # large share of the image: 29 dB tiled against 37 dB whole on this scene
    assert 25.0 < psnrs[True] <= psnrs[False] + 0.5 and psnrs[False] > 30.0
    with reuse_models():  # a model reused across batch jobs takes each job's own choice
        assert load(None, "cpu", "auto", False, None, vae_tiling=True).pipe.vae.use_tiling
        assert not load(None, "cpu", "auto", False, None).pipe.vae.use_tiling
