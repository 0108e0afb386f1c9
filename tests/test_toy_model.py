"""The shipped toy model: loads with diffusers, follows prompts by the checker, round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffedit.models import DEFAULT_MODEL, load_model
from diffedit.plan import plan_job
from diffedit.toy.shapes import make_scene
from lab.toy.quality import ddim_round_trip_psnr, generate_batch, judge, photos_64, plain_background_error, vae_psnr

GUIDANCE = 5.0


@pytest.fixture(scope="module")
def toy():
    return load_model(DEFAULT_MODEL, device="cpu")


def test_loads_with_diffusers_and_is_small():
    folder = DEFAULT_MODEL
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not list(folder.rglob("*.bin"))  # safetensors only


def test_is_the_default_model(toy):
    assert toy.name == "sd1" and toy.default_size() == (64, 64)


def test_draws_what_it_is_asked(toy):
    """Issue 28's bar (90 % right shape and colour) on 80 seeded images: four prompts in the training
    template and four as people type them, ten seeds each, the issue's named examples among them. A rate,
    not every image: at the measured 95-97 % two misses among 12 fixed images happen about one time in
    twelve, and did for one UNet of equal measured quality (samples/toy-sd/v3.md)."""
    prompts = [("a red circle on a white background", "circle", "red"),
               ("a blue square on a white background", "square", "blue"),
               ("a green triangle on a grey background", "triangle", "green"),
               ("a yellow star on a black background", "star", "yellow"),
               ("a red circle", "circle", "red"), ("a blue square", "square", "blue"),
               ("green triangle", "triangle", "green"), ("yellow star", "star", "yellow")]
    seeds = range(1, 11)
    batch = [(p, s, c, seed) for p, s, c in prompts for seed in seeds]
    images = generate_batch(toy, [b[0] for b in batch], [b[3] for b in batch], steps=25, guidance_scale=GUIDANCE)
    right = [all(judge(image, shape, colour)) for image, (_, shape, colour, _) in zip(images, batch)]
    assert sum(right) >= 0.9 * len(right), sum(right)
    per_prompt = [sum(right[k:k + len(seeds)]) for k in range(0, len(right), len(seeds))]
    assert min(per_prompt) >= 8, dict(zip((p for p, _, _ in prompts), per_prompt))  # no prompt left behind


def test_vae_round_trips(toy):
    # issue 28's bars: 32 dB on shapes scenes, 27 dB on the scikit-image photos at 64x64, and scenes
    # put on pure white or pure black back within 2 levels (the background's mean, per channel)
    assert vae_psnr(toy, [make_scene(10**8 + i).image for i in range(24)]) >= 32.0
    assert vae_psnr(toy, photos_64()) >= 27.0
    errors = plain_background_error(toy, colours=((255, 255, 255), (0, 0, 0)))
    assert max(errors.values()) <= 2.0, errors
    # the RGB cube's other corners: 25-34 levels off before phase 5 drew them (samples/toy-sd/v3.md)
    errors = plain_background_error(toy, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)))
    assert max(errors.values()) <= 20.0 and sorted(errors.values())[-2] <= 8.0, errors


def test_every_plain_colour_round_trips_within_2_levels_with_decoder_inversion(toy):
    """Issue 28's plain-colour bar on the decoder of phase 6: from the encoder's latent the panel's
    colours come back up to 15 levels off, refined by 50 steps of decoder inversion each within 2 (the
    whole panel, 8 scenes a colour, in benchmarks/results/v3-vae; here its first scene, the six
    saturated corners and three colours the encoder's latent misses most)."""
    colours = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
               (0, 160, 0), (250, 150, 40), (200, 60, 90))
    plain = plain_background_error(toy, colours=colours, scenes=1)
    folder_setting, toy.decoder_inversion = toy.decoder_inversion, 50
    try:
        refined = plain_background_error(toy, colours=colours, scenes=1)
    finally:
        toy.decoder_inversion = folder_setting
    assert max(plain.values()) > 5.0, plain  # what the refinement closes
    assert max(refined.values()) <= 2.0, refined


def test_ddim_round_trip_reaches_28_db(toy):
    # issue 4's bar for DDIM invert -> reconstruct at 50 steps (the report averages 12 scenes)
    assert ddim_round_trip_psnr(toy, scenes=4) >= 28.0


def test_exact_engines_on_the_toy_model(toy):
    from PIL import Image

    from diffedit.jobs import invert_image

    scene = Image.fromarray(make_scene(10**8 + 5).image)
    errors = {}
    for engine in ("ddim", "ddpm-ef", "bdia", "direct", "infedit"):
        _, result = invert_image(toy, scene, plan_job(toy, engine=engine, steps=20), prompt=make_scene(10**8 + 5).caption)
        errors[engine] = result["latent_max_abs"]
        if engine != "ddim":
            assert result["latent_max_abs"] <= 1e-4, engine
            assert result["psnr"] == pytest.approx(result["vae_psnr"], abs=0.01)
    assert errors["ddim"] > 100 * max(errors["ddpm-ef"], errors["bdia"], 1e-6)
    assert torch.isfinite(torch.tensor(list(errors.values()))).all() and np.isfinite(errors["ddim"])


def test_shapesbench_erase_task_with_the_shipped_adapter(toy):
    """An erase task: the scene regenerated after attaching the red adapter has no red object left;
    without the adapter the same regeneration keeps it. (On the toy model v2 the rest of the scene
    does not stay in place: 0 of 10 erase tasks succeed in full, samples/toy-sd-spm/README.md.)"""
    from PIL import Image

    from diffedit.jobs import edit_image
    from diffedit.toy.checker import check
    from lab.toy import bench

    task = next(t for t in bench.load_tasks() if t["id"] == "erase-002")
    source = Image.fromarray(bench.source_scene(task).image)
    image, result = bench.concept_erase(toy, task, source, {"engine": "ddim"})
    found = check(np.asarray(image))
    assert found and not any(d.colour == "red" for d in found)
    assert result["nfe"] == 100
    assert toy.membranes is None  # the adapter is detached afterwards
    kept, _, _ = edit_image(toy, source, plan_job(toy), source_prompt=task["source_prompt"], target_prompt=task["target_prompt"])
    assert any(d.colour == "red" for d in check(np.asarray(kept)))


def test_tune_decoder_keeps_the_latents(tmp_path):
    """The last training phase (`toy tune-decoder`) changes the decoder only, in place, and resumes
    only a tuning of the same starting weights."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    from lab.toy.train import TrainConfig, tune_decoder

    shutil.copytree(DEFAULT_MODEL / "vae", tmp_path / "model" / "vae")
    before = AutoencoderKL.from_pretrained(tmp_path / "model" / "vae")
    config = TrainConfig(decoder_mse_steps=2, vae_batch=2, checkpoint_every=1)
    tune_decoder(tmp_path / "model", tmp_path / "work", config, lambda *_: None)
    after = AutoencoderKL.from_pretrained(tmp_path / "model" / "vae")
    for part in ("encoder", "quant_conv", "decoder"):
        old, new = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == (part != "decoder"), part
    saved = json.loads((tmp_path / "model" / "vae" / "config.json").read_text())
    assert "_name_or_path" not in saved and saved["scaling_factor"] == before.config.scaling_factor
    assert not (tmp_path / "model" / "vae.tmp").exists()
    tune_decoder(tmp_path / "model", tmp_path / "work", config, lambda *_: None)  # other start: a new run
    assert len(list((tmp_path / "work").glob("decoder_mse-*.ckpt"))) == 2
    shutil.copytree(DEFAULT_MODEL / "vae", tmp_path / "again" / "vae")  # the first start, another recipe
    other = TrainConfig(decoder_mse_steps=2, decoder_plain_fraction=1.0, vae_batch=2, checkpoint_every=1)
    tune_decoder(tmp_path / "again", tmp_path / "work", other, lambda *_: None)
    assert len(list((tmp_path / "work").glob("decoder_mse-*.ckpt"))) == 3


def test_tune_layout_trains_the_unet_in_place_and_resumes_a_run_from_the_same_start(tmp_path):
    """`toy tune-layout` (phase 3b again on a saved model) changes the UNet and the text encoder, not the
    VAE, leaves no staging folder, and a second run from the same weights and recipe resumes the first
    one's finished checkpoint to the same weights."""
    import shutil

    from lab.toy.train import TrainConfig, tune_saved_layout

    config = TrainConfig(seed=1, layout_steps=2, layout_pairs=3, layout_batch=1, unet_batch=2, dataset=6, warmup=1,
                         checkpoint_every=1)
    for name in ("model", "again"):
        shutil.copytree(DEFAULT_MODEL, tmp_path / name)
        tune_saved_layout(tmp_path / name, tmp_path / "work", config, lambda *_: None)
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.endswith(".tmp")]
    assert len(list((tmp_path / "work").glob("layout-*.ckpt"))) == 1
    for part in ("unet", "text_encoder", "vae"):
        for f in (DEFAULT_MODEL / part).glob("*.safetensors"):
            tuned, again = (tmp_path / "model" / part / f.name).read_bytes(), (tmp_path / "again" / part / f.name).read_bytes()
            assert (tuned == f.read_bytes()) == (part == "vae"), part
            assert tuned == again, part


def test_tune_decoder_cli_names_a_folder_without_a_vae(tmp_path, cli):
    code, _, err = cli("toy", "tune-decoder", "-m", tmp_path, "--work", tmp_path / "work")
    assert code == 1 and f"{tmp_path}: no VAE folder" in err
    assert not (tmp_path / "work").exists()


def test_tune_layout_cli_names_a_folder_without_a_unet(tmp_path, cli):
    code, _, err = cli("toy", "tune-layout", "-m", tmp_path, "--work", tmp_path / "work")
    assert code == 1 and f"{tmp_path}: no toy SD model" in err
    assert not (tmp_path / "work").exists()


def _embeddings(tokenizer, encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def test_shipped_text_encoder_looks_one_word_back_and_binds_each_colour_to_its_shape(toy):
    """v4's previous-word text encoder: a recolour changes the colour's token and its shape's, nothing of
    the other object; and when a two-object prompt's shapes and colours are all drawn, each colour is on
    its own shape (these 20 prompts at 25 steps: bound in 12 of 12, none swapped; v3, word-local, bound 3
    of 8 and swapped 25 %; 100 at 50 steps: 65 % drawn as asked, 0 % swapped, v3 12 and 25 %;
    samples/toy-sd/README.md)."""
    from lab.toy import model as toy_model
    from lab.toy.quality import pair_following

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    assert toy_model.text_context(pipe.text_encoder) == "previous"
    assert _changed_tokens(pipe.tokenizer, pipe.text_encoder, ["a red circle and a blue square on a white background",
                                                               "a green circle and a blue square on a white background"],
                           tolerance=1e-4) == [2, 3]  # start token, "a", then the colour and its shape
    pairs = pair_following(toy, 20, steps=25, guidance_scale=7.5)
    bound = pairs["pair_both_pct"] / max(pairs["pair_parts_pct"], 1e-9)
    assert pairs["pair_parts_pct"] >= 15 and bound >= 0.9 and pairs["pair_swapped_pct"] <= 5, pairs


def test_object_words_attend_to_their_objects(toy):
    """Issue 28's first ask: word tokens whose cross-attention maps localise their objects. Phase 7's
    token-grounding loss trains it; v3, trained without it, spread an object word's attention over the
    whole image (measured on 64 scenes: 33.6 against 9.7 % of each object word's mass inside its object;
    samples/toy-sd/README.md)."""
    from lab.toy.quality import word_grounding

    assert word_grounding(toy, scenes=32) >= 25


def _trained_briefly(encoder, tokenizer):
    """`encoder` made trainable and trained 3 steps (so a context that training could undo would show)."""
    from lab.toy import model as toy_model

    encoder = toy_model.trainable_text_encoder(encoder)
    before = encoder.get_input_embeddings().weight.detach().clone()
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    ids = tokenizer(["a red circle and a blue square on a grey background"], padding="max_length",
                    return_tensors="pt").input_ids
    for _ in range(3):
        loss = (encoder(ids)[0] - torch.linspace(-1, 1, ids.shape[1])[:, None]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, encoder.get_input_embeddings().weight)  # it learns
    return encoder


def _changed_tokens(tokenizer, encoder, prompts, tolerance=0.0):
    emb = _embeddings(tokenizer, encoder, prompts)
    return ((emb[0] - emb[1]).abs().amax(-1) > tolerance).nonzero().flatten().tolist()


@pytest.mark.parametrize("context, changed", [("word", [1]), ("previous", [1, 2])])
def test_local_encoders_keep_their_context_when_trained(context, changed):
    """"red" -> "blue" in "red circle and blue square": the word-local encoder changes the colour's token
    only; the previous-word one the colour's and its shape's (token 2, "circle"), nothing after it, so the
    shape's token knows its colour and no other object's; CLIP's causal mixing changes every later token."""
    from lab.toy import model as toy_model

    tokenizer = toy_model.make_tokenizer()
    encoder = _trained_briefly(toy_model.make_text_encoder(tokenizer, context), tokenizer)
    assert toy_model.text_context(encoder) == context
    prompts = ["red circle and blue square", "blue circle and blue square"]
    assert _changed_tokens(tokenizer, encoder, prompts, tolerance=1e-4) == changed
    assert _changed_tokens(tokenizer, encoder, prompts[::-1], tolerance=1e-4) == changed
    causal = toy_model.make_text_encoder(tokenizer, "causal")
    assert toy_model.text_context(causal) == "causal" and len(_changed_tokens(tokenizer, causal, prompts)) > 3


def test_previous_word_encoder_keeps_its_position_code_out_of_the_words():
    """The look-one-back attention reads a position code that training leaves alone: no word embedding
    gains a component in its dims, and the queries and keys stay fixed."""
    from lab.toy import model as toy_model

    tokenizer = toy_model.make_tokenizer()
    fresh = toy_model.make_text_encoder(tokenizer, "previous")
    code = fresh.embeddings.position_embedding.weight[:, toy_model.POSITION_CODE].clone()
    encoder = _trained_briefly(toy_model.make_text_encoder(tokenizer, "previous"), tokenizer)
    assert not encoder.get_input_embeddings().weight[:, toy_model.POSITION_CODE].any()
    torch.testing.assert_close(encoder.embeddings.position_embedding.weight[:, toy_model.POSITION_CODE], code,
                               rtol=1e-3, atol=0)  # AdamW's decoupled weight decay only
    for name in ("q_proj", "k_proj"):
        assert torch.equal(getattr(encoder.encoder.layers[0].self_attn, name).weight,
                           getattr(fresh.encoder.layers[0].self_attn, name).weight)
    assert _changed_tokens(tokenizer, encoder, ["red circle", "blue circle"], tolerance=1e-4) == [1, 2]


def test_layout_follows_the_attention_maps(toy):
    """The layout-in-attention diagnostic (`diffedit toy layout`) on the first recolour tasks: with
    every attention map of the target taken from the source, the objects stay where they were. The
    toy model v1 kept 5 % of the tasks within 2 px (median shift 7.8 px), v2 60 % of all 40, v3 90 %;
    v4 keeps 95 % (issue 28's bar: 90 %), all 6 here, 5 of them against the no-edit control
    (samples/toy-sd/README.md)."""
    from lab.toy.bench import load_tasks
    from lab.toy.quality import layout_in_attention

    tasks = [t for t in load_tasks() if t["kind"] == "recolour"][:6]
    result = layout_in_attention(toy, tasks, steps=50)
    assert result["kept_pct"] >= 80 and result["median_shift_px"] <= 1.5, result
    # the no-edit control, regenerated beside the edit, tells the word's moves from the regeneration's
    assert result["kept_vs_control_pct"] >= 80, result  # 5 of the 6
    assert len(result["control_shifts_px"]) == len(result["shifts_vs_control_px"]) == 6


def test_word_only_targets_differ_from_the_source_at_the_swapped_word_alone(toy):
    """`toy layout --word-only`: v4's tokens see the word before them, so "a purple triangle" and "a red
    triangle" are encoded differently at the colour and at the shape word; the word-only target keeps
    the source's encoding everywhere but at the colour's token, in the guided branch only."""
    from diffedit.denoiser import prompt_denoiser_for
    from lab.toy.quality import SourceMaps, _source_tokens_but_the_word

    rows = ["a purple triangle on a white background", "a red triangle on a white background",
            "a purple triangle on a white background"]

    def changed(batch):  # token positions where the target's encoding differs from the source's
        cond, n = batch.cond.tensors["text"], len(rows)
        start = batch.branches.index("cond") * n
        return (cond[start + 1] - cond[start]).abs().amax(-1).gt(1e-6).nonzero().flatten().tolist()

    with torch.inference_mode():
        batch = prompt_denoiser_for(toy, rows, 7.5, 64, 64, controller=SourceMaps())
        before, uncond = changed(batch), batch.cond.tensors["text"][:3].clone()
        _source_tokens_but_the_word(toy, batch, rows)
    assert before == [2, 3]  # the colour's token and the shape's, which sees it
    assert changed(batch) == [2]
    assert batch.branches.index("cond") != 0 and torch.equal(batch.cond.tensors["text"][:3], uncond)
