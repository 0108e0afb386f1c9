"""Micro-batched invert, reconstruct and edit: every engine runs several images in shared forwards,
and each image's record, result and output are what it gets alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.engines import split_tensors, stack_tensors
from diffedit.jobs import edit_images, edit_record, edit_records, invert_image, invert_images, reconstruct_records
from diffedit.plan import plan_job

UNET_ENGINES = ["ddim", "ddim-p2p", "direct", "ddpm-ef", "bdia", "infedit"]
FLOW_ENGINES = ["rf-inversion", "rf-solver", "fireflow", "flowedit"]
# three images: different pictures, source prompts, seeds (targets: one word swapped, one added)
# Records agree to this fraction of each tensor's largest value; BDIA's inversion divides by gamma at
# every step, so the rounding of a batched forward grows a little more there.
RECORD_TOLERANCE = {"bdia": 3e-5}
SOURCES = ["a red cat", "a blue dog", "a red dog"]
TARGETS = ["a blue cat", "a red dog", "a red big dog"]


def pictures(n: int = 3, side: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def levels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def lone_and_batched(model, engine: str, steps: int, **params):
    plan = plan_job(model, engine=engine, steps=steps, params=params or None)
    images, seeds = pictures(), [3, 11, 7]
    lone = [invert_image(model, img, replace(plan, seed=seed), prompt=src)
            for img, src, seed in zip(images, SOURCES, seeds)]
    batched = invert_images(model, images, plan, prompts=SOURCES, seeds=seeds)
    return plan, seeds, lone, batched


@pytest.mark.parametrize("engine", UNET_ENGINES + FLOW_ENGINES)
def test_every_engine_batched_gives_each_image_its_lone_record_and_edit(tiny, engine):
    _, model = tiny("sd3" if engine in FLOW_ENGINES else "sd1")
    steps = 8 if engine == "fireflow" else 6
    plan, seeds, lone, batched = lone_and_batched(model, engine, steps)
    for (rec_alone, res_alone), (rec, res) in zip(lone, batched):
        assert rec.meta == rec_alone.meta
        assert rec.tensors.keys() == rec_alone.tensors.keys()
        for key, t in rec_alone.tensors.items():  # equal but for the float rounding of batched GEMMs
            assert float((rec.tensors[key] - t).abs().max()) <= RECORD_TOLERANCE.get(engine, 1e-5) * float(t.abs().max()), key
        assert res["psnr"] == pytest.approx(res_alone["psnr"], abs=0.05)
        assert res["batched"] == 3 and "batched" not in res_alone
    records = [rec for rec, _ in lone]
    plans = [replace(plan, seed=seed) for seed in seeds]
    edited = edit_records(model, records, TARGETS, plans)
    for rec, target, seed, (out, result) in zip(records, TARGETS, seeds, edited):
        alone, _ = edit_record(model, rec, target, replace(plan, seed=seed))
        assert np.abs(levels(out) - levels(alone)).max() <= 1, engine
    one_forward = edited[0][1]["forwards"]
    assert min(one_forward) >= 3  # every forward carried all three images (with their branches)


def test_reconstructions_and_edits_in_one_batch_run_apart(tiny):
    """Direct Inversion returns a reconstruction's inverted latent without a network call; an edit of
    the same group must not drag it through prompt-to-prompt."""
    _, model = tiny("sd1")
    plan, seeds, lone, _ = lone_and_batched(model, "direct", 5)
    records = [rec for rec, _ in lone]
    targets = [SOURCES[0], TARGETS[1], SOURCES[2]]  # two reconstructions, one edit
    out = edit_records(model, records, targets, [replace(plan, seed=s) for s in seeds])
    for rec, target, seed, (image, result) in zip(records, targets, seeds, out):
        alone, alone_result = edit_record(model, rec, target, replace(plan, seed=seed))
        assert np.array_equal(levels(image), levels(alone))
        assert result["nfe"] == alone_result["nfe"]  # 0 for the reconstructions, as alone


def test_batched_reconstruct_and_edit_from_images_match_lone_jobs(tiny):
    _, model = tiny("sd1")
    plan, seeds, lone, _ = lone_and_batched(model, "ddpm-ef", 6)
    records = [rec for rec, _ in lone]
    for (image, result), rec in zip(reconstruct_records(model, records), records):
        assert result["latent_max_abs"] < 1e-4 and result["batched"] == 3  # ddpm-ef is exact
    edits = edit_images(model, pictures(), plan, source_prompts=SOURCES, target_prompts=TARGETS, seeds=seeds)
    for (out, result, rec), rec_alone, target, seed in zip(edits, records, TARGETS, seeds):
        alone, _ = edit_record(model, rec_alone, target, replace(plan, seed=seed))
        assert np.abs(levels(out) - levels(alone)).max() <= 1


def test_images_of_different_sizes_batch_by_size(tiny):
    _, model = tiny("sd1")
    plan = plan_job(model, engine="ddim", steps=4)
    images = [pictures(1, 32)[0], pictures(1, 48)[0], pictures(1, 32)[0]]
    out = invert_images(model, images, plan, prompts=SOURCES)
    assert [r.get("batched", 1) for _, r in out] == [2, 1, 2]
    assert [rec.tensors["noise"].shape[-1] * model.vae_scale for rec, _ in out] == [32, 48, 32]


def test_batched_tensors_split_back_into_each_records_own():
    records = [{"noise": torch.randn(1, 4, 3, 3), "trajectory": torch.randn(5, 4, 3, 3),
                "xs": torch.randn(6, 1, 4, 3, 3), "start": torch.tensor(2)} for _ in range(3)]
    batch = stack_tensors(records)
    assert batch["trajectory"].shape == (5, 3, 4, 3, 3) and batch["xs"].shape == (6, 3, 4, 3, 3)
    for alone, back in zip(records, split_tensors(batch, 3)):
        assert all(torch.equal(alone[k], back[k]) for k in alone)
    with pytest.raises(ValueError, match="start"):
        stack_tensors([records[0], {**records[1], "start": torch.tensor(3)}])


def test_batched_moves_equal_lone_moves(tiny):
    """PixelMan moves of different objects, by different offsets and seeds, share forwards and energy
    passes; each output is its lone move's."""
    from diffedit.editing.pixelman import EnergyWeights, MoveSpec
    from diffedit.jobs import MoveInput, move_image, move_images

    _, model = tiny("sd1")
    images, energy = pictures(), EnergyWeights.at_scale(0.5)
    masks = []
    for top, left in ((4, 4), (16, 8), (8, 18)):
        mask = np.zeros((32, 32), np.uint8)
        mask[top : top + 10, left : left + 10] = 255
        masks.append(Image.fromarray(mask))
    moves = [MoveSpec(8, 4), MoveSpec(-6, 2), MoveSpec(0, 8, scale=0.8)]
    together = move_images(model, [MoveInput(img, mask, move, seed) for img, mask, move, seed
                                   in zip(images, masks, moves, [3, 11, 7])], steps=4, energy=energy)
    for (out, result), img, mask, move, seed in zip(together, images, masks, moves, [3, 11, 7]):
        alone, alone_result = move_image(model, img, mask, move, steps=4, seed=seed, energy=energy)
        assert np.abs(levels(out) - levels(alone)).max() <= 1
        assert result["moved_to"] == alone_result["moved_to"] and result["batched"] == 3
        assert result["energy_passes"] == alone_result["energy_passes"]  # each pass carried all three
