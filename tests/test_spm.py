"""SPM concept erasure: membranes (identity at init, removable, files), facilitated transport,
training (loss falls, resume = uninterrupted), the CLI, and the shipped toy adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffedit.editing import spm
from diffedit.editing.spm.training import neutral_prompt
from diffedit.errors import DiffeditError, UsageError
from diffedit.jobs import generate_image
from diffedit.plan import plan_job

SHIPPED = Path(__file__).resolve().parents[1] / "samples" / "toy-sd-spm"
H = W = 32


def _random_up(membrane: spm.Membrane, seed: int = 1, scale: float = 0.5) -> spm.Membrane:
    gen = torch.Generator().manual_seed(seed)
    membrane.weights = {n: (d, torch.randn(u.shape, generator=gen) * scale) for n, (d, u) in membrane.weights.items()}
    return membrane


def _forward(model, prompts, seed=0):
    cond, _ = model.encode_prompts(prompts, None, H, W)
    if model.membranes is not None:
        cond = model.membranes.tag(cond, prompts)
    x = torch.randn(model.latent_shape(len(prompts), H, W), generator=torch.Generator().manual_seed(seed))
    t = model.schedule(10, H, W).times[3]
    rows = model.membranes.rows(cond.tensors.get("spm")) if model.membranes is not None else None
    with torch.inference_mode():
        if rows is None:
            return model.forward(x, t, cond)
        with rows:
            return model.forward(x, t, cond)


def test_layers_are_the_transformer_blocks_linear_and_conv(tiny):
    _, model = tiny("sd1")
    layers = spm.target_layers(model.network)
    assert all(".attentions." in n for n in layers)
    kinds = {n.rsplit(".", 1)[-1] for n in layers}
    assert {"to_q", "to_k", "to_v", "proj_in", "proj_out"} <= kinds
    membrane = spm.Membrane.new(model, "red")
    assert all(u.abs().sum() == 0 for _, u in membrane.weights.values())  # up starts at zero
    total = sum(p.numel() for p in model.network.parameters())
    assert membrane.params < total / 20


def test_zero_init_is_identity_and_removal_is_bit_identical(tiny):
    _, model = tiny("sd1")
    base = _forward(model, ["a red cat"])
    spm.attach(model, [spm.Membrane.new(model, "red")], transport="off")
    assert torch.equal(_forward(model, ["a red cat"]), base)
    spm.attach(model, [_random_up(spm.Membrane.new(model, "red"))], transport="off")
    assert not torch.allclose(_forward(model, ["a red cat"]), base)
    spm.detach(model)
    assert model.membranes is None
    assert torch.equal(_forward(model, ["a red cat"]), base)
    img0, _ = generate_image(model, "a red cat", seed=3, steps=4, width=W, height=H)
    spm.attach(model, [_random_up(spm.Membrane.new(model, "red"))])
    spm.detach(model)
    img1, _ = generate_image(model, "a red cat", seed=3, steps=4, width=W, height=H)
    assert np.array_equal(np.asarray(img0), np.asarray(img1))


def test_save_load_round_trip_with_metadata(tiny, tmp_path):
    _, model = tiny("sd1")
    membrane = _random_up(spm.Membrane.new(model, "red", surrogate="blue"))
    membrane.training = {"iterations": 7, "lr": 0.001}
    path = tmp_path / "red.spm.safetensors"
    membrane.save(path, dtype=torch.float32)
    back = spm.Membrane.load(path)
    assert (back.concept, back.surrogate, back.family, back.prompts) == ("red", "blue", "sd1", ["red"])
    assert back.training == {"iterations": 7, "lr": 0.001} and back.base["fingerprint"] == model.fingerprint
    assert back.digest == membrane.digest
    spm.attach(model, [membrane], "off")
    a = _forward(model, ["a red cat"])
    spm.attach(model, [back], "off")
    b = _forward(model, ["a red cat"])
    spm.detach(model)
    assert torch.equal(a, b)
    with pytest.raises(DiffeditError, match="already exists"):
        membrane.save(path)


def test_bad_adapters_are_refused(tiny, tmp_path):
    _, sd1 = tiny("sd1")
    _, sd2 = tiny("sd2")
    path = tmp_path / "red.spm.safetensors"
    spm.Membrane.new(sd1, "red").save(path)
    with pytest.raises(DiffeditError, match="red.spm.safetensors: adapter for model family sd1, but the model is sd2"):
        spm.apply_files(sd2, [path])
    assert sd2.membranes is None
    corrupt = tmp_path / "corrupt.spm.safetensors"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DiffeditError, match="corrupt.spm.safetensors: not a readable SPM adapter"):
        spm.Membrane.load(corrupt)
    garbage = tmp_path / "garbage.spm.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(DiffeditError, match="garbage.spm.safetensors"):
        spm.Membrane.load(garbage)
    with pytest.raises(DiffeditError, match="no such adapter file"):
        spm.Membrane.load(tmp_path / "missing.spm.safetensors")
    with pytest.raises(UsageError, match="--concept"):
        spm.Membrane.new(sd1, "  ")
    with pytest.raises(UsageError, match="--concept"):
        spm.train(sd1, "", config=spm.TrainConfig(iterations=1))
    other = spm.Membrane.new(sd1, "red")  # same family, another architecture
    name = next(iter(other.weights))
    other.weights[name] = (torch.zeros(1, 3), other.weights[name][1])
    with pytest.raises(DiffeditError, match="has shapes"):
        spm.attach(sd1, [other])


def test_facilitated_transport_multipliers(tiny):
    _, model = tiny("sd1")
    membranes = spm.attach(model, [spm.Membrane.new(model, "red")])
    prompts = ["red", "a red cat", "a photo of a blue dog", ""]
    cond, _ = model.encode_prompts(prompts, None, H, W)
    m = membranes.multipliers(prompts, cond.tensors["text"])[:, 0]
    assert m[0] == pytest.approx(1.0) and m[1] == 1.0  # the concept itself; a prompt naming it
    assert m[2] == 0.0 and m[3] == 0.0  # unrelated; empty
    spm.attach(model, [spm.Membrane.new(model, "red")], transport="paper")
    raw = model.membranes.multipliers(prompts, cond.tensors["text"])[:, 0]
    assert raw[2] > 0 and raw[3] > 0.5  # the paper's raw cosine: nothing is far from a short concept
    spm.attach(model, [spm.Membrane.new(model, "red")], transport="off")
    assert torch.equal(model.membranes.multipliers(prompts, None), torch.ones(4, 1))
    spm.detach(model)


def test_each_row_gets_its_own_multiplier_and_it_scales_the_product(tiny):
    _, model = tiny("sd1")
    base = _forward(model, ["a red cat", "a blue dog"])
    membranes = spm.attach(model, [_random_up(spm.Membrane.new(model, "red"))])  # calibrated: rows 1, 0
    both = _forward(model, ["a red cat", "a blue dog"])
    assert torch.equal(both[1], base[1])  # the unrelated row is untouched, bit for bit
    assert not torch.allclose(both[0], base[0])
    cond, _ = model.encode_prompts(["a red cat"], None, H, W)
    x = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(0))[:1]
    t = model.schedule(10, H, W).times[3]

    def at(mult):
        with torch.inference_mode(), membranes.rows(torch.tensor([[mult]])):
            return model.forward(x, t, cond)

    assert torch.allclose(at(1.0)[0], both[0], atol=1e-6)
    # linear in the multiplier (one factor, not both): the change at 0.5 is half the change at 1
    # (the network is not linear in its layers' outputs, so only approximately; 2x would be 0.25)
    full, half = (at(1.0) - base[:1]).norm(), (at(0.5) - base[:1]).norm()
    assert 0.35 < float(half / full) < 0.65
    spm.detach(model)


def test_two_membranes_combine_per_row(tiny):
    _, model = tiny("sd1")
    red, dog = _random_up(spm.Membrane.new(model, "red"), 1), _random_up(spm.Membrane.new(model, "dog"), 2)
    prompts = ["a red cat", "a blue dog", "a green car"]
    base = _forward(model, prompts)
    spm.attach(model, [red, dog])
    cond, _ = model.encode_prompts(prompts, None, H, W)
    assert model.membranes.multipliers(prompts, cond.tensors["text"]).tolist() == [[1, 0], [0, 1], [0, 0]]
    out = _forward(model, prompts)
    spm.attach(model, [dog])
    only_dog = _forward(model, prompts)
    spm.detach(model)
    assert torch.equal(out[2], base[2])
    assert torch.allclose(out[1], only_dog[1], atol=1e-6)


def test_training_lowers_the_erase_loss_and_resumes_exactly(tiny, tmp_path):
    _, model = tiny("sd1")
    config = spm.TrainConfig(iterations=12, lr=1e-2, warmup=2, steps=6, anchors=2, size=H)
    before = spm.erase_loss(model, spm.Membrane.new(model, "red"), "red", config=config)
    flags = [p.requires_grad for p in model.network.parameters()]
    whole, info = spm.train(model, "red", config=config)
    assert len(info["losses"]) == 12
    after = spm.erase_loss(model, whole, "red", config=config)
    assert after < 0.8 * before
    assert model.membranes is None and [p.requires_grad for p in model.network.parameters()] == flags
    ckpt = tmp_path / "ckpt.pt"
    spm.train(model, "red", config=config, checkpoint=ckpt, every=5, stop_after=5)
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    resumed, _ = spm.train(model, "red", config=config, checkpoint=ckpt, every=5)
    assert resumed.digest == whole.digest
    with pytest.raises(DiffeditError, match="checkpoint of another training run"):
        spm.train(model, "blue", config=config, checkpoint=ckpt)
    with pytest.raises(UsageError, match="does not name the concept"):
        spm.train(model, "red", prompts=["a hundred cats"], config=config)
    assert neutral_prompt("a Red cat on a red mat", "red", "") == "a cat on a mat"
    assert neutral_prompt("red", "red", "blue") == "blue"


def test_cli_train_info_generate_and_records(cli, tmp_path, tiny_folder):
    sd1, sd2 = tiny_folder("sd1"), tiny_folder("sd2")
    out = tmp_path / "red.spm.safetensors"
    code, stdout, err = cli("erase", "train", "--concept", "red", "-o", out, "-m", sd1, "--iterations", "3",
                            "--warmup", "1", "--steps", "4", "--work", tmp_path / "work", "--json")
    assert code == 0, err
    assert json.loads(stdout)["iterations"] == 3 and out.is_file()
    code, stdout, _ = cli("erase", "info", out, "--json")
    info = json.loads(stdout)
    assert (info["concept"], info["family"], info["training"]["iterations"]) == ("red", "sd1", 3)
    code, _, err = cli("erase", "train", "--concept", "", "-o", tmp_path / "x.spm.safetensors", "-m", sd1)
    assert code == 2 and "--concept" in err
    img = tmp_path / "gen.png"
    code, stdout, err = cli("generate", "a red cat", "-o", img, "-m", sd1, "-n", "3", "--seed", "1",
                            "--adapter", out, "--adapter", out, "--json")
    assert code == 0, err
    from diffedit.images import read_params

    assert [a["concept"] for a in read_params(img)["model"]["adapters"]] == ["red", "red"]
    code, _, err = cli("generate", "a red cat", "-o", tmp_path / "g2.png", "-m", sd2, "-n", "2", "--adapter", out)
    assert code == 1 and "red.spm.safetensors: adapter for model family sd1, but the model is sd2" in err
    corrupt = tmp_path / "bad.spm.safetensors"
    corrupt.write_bytes(b"not safetensors at all")
    code, _, err = cli("generate", "a red cat", "-o", tmp_path / "g3.png", "-m", sd1, "-n", "2", "--adapter", corrupt)
    assert code == 1 and "bad.spm.safetensors" in err and not (tmp_path / "g3.png").exists()
    # records remember their adapters: reconstruct needs the same ones
    scene = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(scene)
    rec = tmp_path / "in.inv.safetensors"
    code, _, err = cli("invert", scene, "-p", "a red cat", "-m", sd1, "-n", "3", "--adapter", out, "-o", rec,
                       "--no-check")
    assert code == 0, err
    code, _, err = cli("reconstruct", rec, "-o", tmp_path / "back.png", "-m", sd1)
    assert code == 1 and "SPM adapters (red.spm.safetensors)" in err
    code, _, err = cli("reconstruct", rec, "-o", tmp_path / "back.png", "-m", sd1, "--adapter", out)
    assert code == 0, err


def test_shipped_adapter_erases_red_on_the_toy_model():
    """The shipped toy adapter: seeded red prompts are red without it and not red with it."""
    from diffedit.models import load_model
    from lab.toy.quality import generate_batch, judge

    model = load_model(None, device="cpu")
    red = ["a red circle on a white background", "a red square on a grey background",
           "a red star on a beige background"]
    kept = ["a blue square on a white background", "a green triangle on a grey background"]
    prompts, seeds = red + kept, [0, 1, 2, 3, 4]
    before = generate_batch(model, prompts, seeds, steps=20, guidance_scale=5.0)
    spm.apply_files(model, [SHIPPED / "red.spm.safetensors"])
    try:
        after = generate_batch(model, prompts, seeds, steps=20, guidance_scale=5.0)
    finally:
        spm.detach(model)
    for image in before[:3]:
        assert judge(image, None, "red")[1]
    for image in after[:3]:
        assert not judge(image, None, "red")[1]
    for image, prompt in zip(after[3:], kept):
        _, colour, shape = prompt.split()[:3]
        assert all(judge(image, shape, colour))


@pytest.mark.parametrize("engine", ["ddpm-ef", "bdia", "direct", "infedit"])
def test_engines_run_with_adapters_and_stay_exact(tiny, tmp_path, engine):
    """Every engine sees the adapters (through the Denoiser); exact engines stay exact with them on."""
    from PIL import Image

    from diffedit.jobs import edit_image, invert_image

    _, model = tiny("sd1")
    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 8:20] = (220, 20, 20)
    path = tmp_path / "square.png"
    Image.fromarray(a).save(path)
    spm.attach(model, [_random_up(spm.Membrane.new(model, "red"), scale=0.05)])
    try:
        record, result = invert_image(model, str(path), plan_job(model, engine=engine, steps=6), prompt="a red square")
        assert result["latent_max_abs"] <= 1e-4
        assert [x["concept"] for x in record.meta["model"]["adapters"]] == ["red"]
        with_adapter, _, _ = edit_image(model, str(path), plan_job(model, engine=engine, steps=6), source_prompt="a red square", target_prompt="a red cat")
    finally:
        spm.detach(model)
    without, _, _ = edit_image(model, str(path), plan_job(model, engine=engine, steps=6), source_prompt="a red square", target_prompt="a red cat")
    assert not np.array_equal(np.asarray(with_adapter), np.asarray(without))


@pytest.mark.parametrize("fam", ["sd2", "sdxl", "sd3", "flux"])
def test_membranes_on_every_family(tiny, fam):
    """Layers found, identity at init, a trained-like adapter changes the prompt's row, removal restores."""
    from diffedit.jobs import generate_image

    _, model = tiny(fam)
    kw = dict(seed=2, steps=3, width=32, height=32)
    base, _ = generate_image(model, "a red cat", **kw)
    spm.attach(model, [spm.Membrane.new(model, "red")])
    same, _ = generate_image(model, "a red cat", **kw)
    spm.attach(model, [_random_up(spm.Membrane.new(model, "red"))])
    changed, _ = generate_image(model, "a red cat", **kw)
    untouched, _ = generate_image(model, "a blue dog", **kw)
    spm.detach(model)
    plain_dog, _ = generate_image(model, "a blue dog", **kw)
    after, _ = generate_image(model, "a red cat", **kw)
    assert np.array_equal(np.asarray(base), np.asarray(same))
    assert not np.array_equal(np.asarray(base), np.asarray(changed))
    assert np.array_equal(np.asarray(untouched), np.asarray(plain_dog))
    assert np.array_equal(np.asarray(base), np.asarray(after))


def test_batch_passes_adapters_through(cli, tmp_path, tiny_folder):
    """A manifest's `adapter` (a path or a list, relative to the manifest) reaches each job; jobs without
    it run on the bare model although the batch reuses the loaded model."""
    from diffedit.images import read_params

    sd1 = tiny_folder("sd1")
    from diffedit.models import load_model

    spm.Membrane.new(load_model(str(sd1), device="cpu"), "red").save(tmp_path / "red.spm.safetensors")
    jobs = [
        {"id": "with", "command": "generate", "prompt": "a red cat", "seed": 1, "steps": 2, "model": str(sd1),
         "adapter": ["red.spm.safetensors"]},
        {"id": "without", "command": "generate", "prompt": "a red cat", "seed": 1, "steps": 2, "model": str(sd1)},
        {"id": "bad", "command": "generate", "prompt": "a red cat", "seed": 1, "steps": 2, "model": str(sd1),
         "adapter": "missing.spm.safetensors"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "out"
    code, _, err = cli("batch", manifest, "--out-dir", out, "-q")
    assert code == 3, err
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["with"]["status"] == "ok" and rows["without"]["status"] == "ok"
    assert "missing.spm.safetensors: no such adapter file" in rows["bad"]["error"]
    assert read_params(out / "with.png")["model"]["adapters"][0]["concept"] == "red"
    assert "adapters" not in read_params(out / "without.png")["model"]


def test_toy_finetune_makes_a_different_loadable_copy(tmp_path):
    """The fine-tuned copy the transfer check uses: loadable, same family, other UNet weights, reproducible."""
    from diffedit.models import load_model
    from lab.toy.train import finetune

    source = Path(__file__).resolve().parents[1] / "samples" / "toy-sd"
    info = finetune(source, tmp_path / "ft", steps=2, seed=3, batch=4, scenes=16)
    assert info["weight_change_l2"] > 0
    tuned = load_model(str(tmp_path / "ft"), device="cpu")
    assert tuned.name == "sd1" and tuned.fingerprint != load_model(str(source), device="cpu").fingerprint
    spm.apply_files(tuned, [SHIPPED / "red.spm.safetensors"])  # an adapter of the original fits the copy
    assert len(tuned.membranes) == 1
    spm.detach(tuned)
    again = finetune(source, tmp_path / "ft2", steps=2, seed=3, batch=4, scenes=16)
    assert again["weight_change_l2"] == info["weight_change_l2"]
