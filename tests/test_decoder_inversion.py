"""Decoder inversion: encoded latents refined by gradient steps until they decode to the image."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffedit.records import load_record


def _pixels(model, seed: int, batch: int = 1) -> torch.Tensor:
    """An image the (random) decoder can make exactly: some latent's decoding, which the encoder misses."""
    g = torch.Generator().manual_seed(seed)
    return model.decode(torch.randn(model.latent_shape(batch, 32, 32), generator=g))


def _error(model, latents, pixels) -> float:
    return float((model.decode(latents) - pixels).pow(2).mean())


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_the_refined_latent_decodes_nearer_the_image(tiny, family):
    _, model = tiny(family)
    x = _pixels(model, 0)
    encoded = model.encode_image(x)
    refined = model.invert_decoder(encoded, x, 30)
    assert _error(model, refined, x) < 0.5 * _error(model, encoded, x)
    assert all(p.requires_grad and p.grad is None for p in model.pipe.vae.parameters())  # the VAE is left as it was


def test_each_image_of_a_batch_is_refined_as_if_alone(tiny):
    _, model = tiny("sd1")
    x = torch.cat([_pixels(model, 1), _pixels(model, 2)])
    together = model.invert_decoder(model.encode_image(x), x, 5)
    alone = torch.cat([model.invert_decoder(model.encode_image(x[i : i + 1]), x[i : i + 1], 5) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_encode_image_refines_by_the_model_s_setting(tiny):
    _, model = tiny("sd1")
    x = _pixels(model, 3)
    try:
        model.decoder_inversion = 10
        with torch.inference_mode():  # as the lab's measures call it: the refinement needs gradients still
            refined = model.encode_image(x)
    finally:
        model.decoder_inversion = 0
    plain = model.encode_image(x)
    torch.testing.assert_close(refined, model.invert_decoder(plain, x, 10))
    assert _error(model, refined, x) < _error(model, plain, x)


def test_the_folder_s_setting_is_the_default_and_the_option_wins(cli, tmp_path, tiny_folder, square):
    """diffedit.json's "vae": {"decoder_inversion": N} refines every encoded image of the model; the
    record says so; --decoder-inversion 0 turns it off; the VAE's ceiling (vae_psnr) shows the gain."""
    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"vae": {"decoder_inversion": 20}}))
    invert = ("invert", square, "-m", model, "-n", "2", "--json", "-q")
    code, out, err = cli(*invert, "-o", tmp_path / "a.safetensors")
    assert code == 0, err
    refined = json.loads(out)
    assert load_record(tmp_path / "a.safetensors").meta["model"]["decoder_inversion"] == 20
    code, out, err = cli(*invert, "-o", tmp_path / "b.safetensors", "--decoder-inversion", "0")
    assert code == 0, err
    assert "decoder_inversion" not in load_record(tmp_path / "b.safetensors").meta["model"]
    assert refined["vae_psnr"] > json.loads(out)["vae_psnr"] + 1.0
    code, out, err = cli("models", "info", model, "--json")
    assert code == 0 and json.loads(out)["recommended"]["vae"] == {"decoder_inversion": 20}


@pytest.mark.parametrize("vae", [{"decoder_inversion": -1}, {"decoder_inversion": 2.5}, {"steps": 3}, [3]])
def test_a_wrong_vae_setting_is_named(cli, tmp_path, tiny_folder, square, vae):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"vae": vae}))
    code, _, err = cli("invert", square, "-m", model, "-n", "2", "-q", "-o", tmp_path / "a.safetensors")
    assert code == 1 and "diffedit.json" in err and "decoder_inversion" in err
    assert not (tmp_path / "a.safetensors").exists()


def test_bench_vae_measures_each_setting_side_by_side(cli, tmp_path):
    """On the shipped toy model (its VAE runs a 64-px scene in milliseconds)."""
    code, out, err = cli("bench", "vae", "--decoder-inversion", "0", "--decoder-inversion", "5",
                         "--quick", "--save", tmp_path, "--json")
    assert code == 0, err
    plain, refined = (json.loads(line) for line in out.splitlines())
    assert (plain["decoder_inversion"], refined["decoder_inversion"]) == (0, 5)
    assert refined["shapes_psnr"] > plain["shapes_psnr"] and refined["photos_psnr"] > plain["photos_psnr"]
    assert refined["encode_seconds"] > 0 and "encode_vs_encoder" in refined  # the cost, reported (not asserted)
    table = (tmp_path / "results.md").read_text()
    assert len(plain["plain_background_error_levels"]) == 16 and "(quick) | 5 |" in table
