"""PixelMan object moves: geometry, attention control, energies, the job, the command and the toy world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.editing.attention import AttnCall, _attend
from diffedit.editing.pixelman import (
    BLOCKED,
    SOURCE,
    TARGET,
    EnergyWeights,
    FeatureEnergy,
    MoveSpec,
    PixelManControl,
    guided_step,
    plan_move,
    repeats,
    warp,
)
from diffedit.images import to_pil, to_tensor
from diffedit.jobs import move_image


def scene(size=32, box=(8, 16, 8, 16), colour=(220, 20, 20), background=200):
    a = np.full((size, size, 3), background, np.uint8)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1] = colour
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(a), Image.fromarray(mask)


@pytest.fixture(scope="module")
def toy_model():
    from diffedit.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL, device="cpu")


@pytest.fixture
def files(tmp_path):
    img, mask = scene()
    img.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path


def test_warp_copies_integer_moves_exactly():
    x = torch.randn(1, 3, 12, 10)
    moved = warp(x, (5.0, 6.0), MoveSpec(3, -2), 1.0)
    expected = torch.zeros_like(x)
    expected[:, :, :10, 3:] = x[:, :, 2:, :7]
    assert torch.allclose(moved, expected, atol=1e-5)
    # the same move on a grid 2x coarser moves by half as many cells
    assert torch.allclose(warp(x, (5.0, 6.0), MoveSpec(4, 2), 2.0)[:, :, 1:, 2:], x[:, :, :-1, :-2], atol=1e-5)


def test_plan_move_masks_and_to():
    _, mask = scene()
    m = torch.from_numpy(np.asarray(mask) > 127)
    masks, centre, move = plan_move(m, MoveSpec(6, 0))
    assert centre == (12.0, 12.0)
    assert masks.gen[8:16, 14:22].all() and masks.gen.sum() == 64
    assert masks.ipt[8:16, 8:14].all() and masks.ipt.sum() == 48  # vacated: the source minus the new place
    assert not (masks.other & (masks.src | masks.gen)).any()
    _, _, move = plan_move(m, MoveSpec(to=(20.0, 4.0)))
    assert (move.dx, move.dy) == (8.0, -8.0)
    masks, _, _ = plan_move(m, MoveSpec(6, 0, keep_source=True))
    assert not masks.ipt.any()  # duplicate: nothing to inpaint
    masks, _, _ = plan_move(m, MoveSpec(0, 0, scale=0.5))
    assert masks.gen.sum() == 16 and masks.gen[10:14, 10:14].all()


def test_schedule_of_the_energy_guidance():
    assert [i for i in range(16) if guided_step(i, 16)] == [0, 1, 2, 4, 6, 8]
    assert [repeats(i, 16) for i in range(16)].count(3) == 1 and repeats(8, 16) == 3


def _call(layer, branches=("cond",)):
    return AttnCall(layer, False, 16, False, 0, branches)


def test_leak_proof_attention_and_key_value_injection():
    """Vacated-region queries of the target row cannot see the object's new place; up-block
    self-attention of the target uses the source's keys and values; other rows are untouched."""
    _, mask = scene()
    masks, _, _ = plan_move(torch.from_numpy(np.asarray(mask) > 127), MoveSpec(8, 8))
    control = PixelManControl(masks, (4, 4))  # one attention cell per 8x8 pixels
    q, k, v = (torch.randn(6, 2, 16, 4) for _ in range(3))  # uncond + cond chunks of [source, anchor, target]
    branches = ("uncond", "cond")
    call = _call("down_blocks.0.attentions.0.transformer_blocks.0.attn1", branches)
    [(rows, queries, keys)] = control.blocks(call, q, k)
    ipt = [5]  # cell (1, 1): pixels 8..16 of the source, which the object leaves
    gen = [10]  # cell (2, 2): pixels 16..24, where it goes
    assert rows.tolist() == [TARGET, 3 + TARGET]
    assert queries.nonzero().flatten().tolist() == ipt and keys.nonzero().flatten().tolist() == gen
    # the same as the reference's dense additive mask on the target rows' logits
    dense = torch.zeros(6, 1, 16, 16)
    dense[rows, 0, 5, 10] = BLOCKED
    assert torch.allclose(_attend(control, call, q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                          atol=1e-6)
    v2 = v.clone()
    v2[:, :, gen] += 100.0  # what the blocked key holds cannot reach the vacated queries of the target
    out1, out2 = _attend(control, call, q, k, v), _attend(control, call, q, k, v2)
    for row in (TARGET, 3 + TARGET):
        assert torch.allclose(out1[row][:, ipt], out2[row][:, ipt], atol=1e-3)
    assert not torch.allclose(out1[SOURCE][:, ipt], out2[SOURCE][:, ipt])
    up = _call("up_blocks.1.attentions.0.transformer_blocks.0.attn1", branches)
    _, k2, v2 = control.qkv(up, q, k, v)
    for chunk in (0, 3):
        assert torch.equal(k2[chunk + TARGET], k[chunk + SOURCE]) and torch.equal(v2[chunk + TARGET], v[chunk + SOURCE])
        assert torch.equal(k2[chunk + SOURCE], k[chunk + SOURCE])
    _, k3, _ = control.qkv(call, q, k, v)
    assert torch.equal(k3, k)  # no injection outside the up blocks


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_null_move_returns_the_image_and_leaves_the_model_clean(tiny, family):
    """dx = dy = 0: the anchor is the source, every energy is at its optimum, and the anchored update
    adds nothing, so the output is the VAE round trip of the input."""
    _, model = tiny(family)
    img, mask = scene()
    x = torch.randn(1, 4, 16, 16)
    cond, _ = model.encode_prompts([""], None, 32, 32)
    with torch.inference_mode():
        before = model.forward(x, torch.tensor(500), cond)
    out, result = move_image(model, img, mask, MoveSpec(0, 0), energy=EnergyWeights())
    round_trip = to_pil(model.decode(model.encode_image(to_tensor(img))))
    assert np.abs(np.asarray(out, np.int16) - np.asarray(round_trip, np.int16)).max() <= 1
    with torch.inference_mode():
        assert torch.equal(model.forward(x, torch.tensor(500), cond), before)
    # 16 batched forwards of [source, anchor, target]; energies on 6 steps (one repeated 3 times):
    # a reference pass per guided step and a forward + two backwards per gradient
    assert result["forwards"] == {3: 16}
    assert result["energy_passes"] == 6 + 8 and result["backward_passes"] == 16
    assert result["nfe"] == 16 + 14


def test_a_move_changes_the_vacated_region_and_keeps_the_pasted_object(tiny):
    _, model = tiny("sd1")
    img, mask = scene()
    plain, _ = move_image(model, img, mask, MoveSpec(12, 8), energy=None)
    guided, result = move_image(model, img, mask, MoveSpec(12, 8), prompt="a red square", energy=EnergyWeights())
    assert result["forwards"] == {6: 16} and result["guidance_scale"] == 4.0  # a prompt turns CFG on
    assert result["moved_to"] == [24.0, 20.0]
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))


def test_energy_step_lowers_the_energy(tiny):
    _, model = tiny("sd1")
    _, mask = scene()
    masks, centre, move = plan_move(torch.from_numpy(np.asarray(mask) > 127), MoveSpec(12, 8))
    cond, _ = model.encode_prompts([""], None, 32, 32)
    energy = FeatureEnergy(model, cond, [(masks, centre, move)], EnergyWeights(scale=1.0, step=1.0), (16, 16))
    torch.manual_seed(0)
    z, z_anchor, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor(700)
    reference = energy.reference(z_anchor, t)
    with torch.no_grad():
        before = sum(energy.energies(z, t, reference))
        step = energy.gradient(z, t, reference)
        after = sum(energy.energies(z - 0.05 * step / step.abs().max(), t, reference))
    assert after < before


def test_move_runs_on_unet_families_only(tiny):
    from diffedit.errors import UsageError

    _, model = tiny("sd3")
    img, mask = scene()
    with pytest.raises(UsageError, match="UNet"):
        move_image(model, img, mask, MoveSpec(4, 4))


def test_cli_move_writes_the_image_and_json(cli, files, tiny_folder):
    out = files / "moved.png"
    code, stdout, err = cli("move", files / "in.png", "--mask", files / "mask.png", "--to", "20,20", "-o", out,
                            "-m", tiny_folder("sd1"), "--json", "-q")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["moved_to"] == [20.0, 20.0] and result["steps"] == 16 and out.exists()
    code, _, err = cli("move", files / "in.png", "--mask", files / "mask.png", "--dx", "4", "--to", "1,1",
                       "-o", files / "x.png", "-m", tiny_folder("sd1"))
    assert code == 2 and "either" in err


@pytest.mark.parametrize("case, message", [
    ("empty", "mask is empty"),
    ("size", "mask is 16x16 pixels but the image is 32x32"),
    ("outside", "fully outside the frame"),
    ("whole", "covers the whole image"),
])
def test_cli_move_bad_input(cli, files, tiny_folder, case, message):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    dx = "4"
    if case == "empty":
        mask[:] = 0
    elif case == "size":
        mask = mask[:16, :16]
    elif case == "outside":
        dx = "40"
    else:
        mask[:] = 255
    Image.fromarray(mask).save(files / "bad.png")
    out = files / "out.png"
    code, _, err = cli("move", files / "in.png", "--mask", files / "bad.png", "--dx", dx, "--dy", "0", "-o", out,
                       "-m", tiny_folder("sd1"), "-q")
    assert code == 1
    assert message in err and "bad.png" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_transparent_masks_select_opaque_pixels(files, tiny):
    """A mask drawn as transparency: the opaque pixels are the object."""
    from diffedit.images import load_mask

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[4:10, 4:10, 3] = 255
    Image.fromarray(rgba).save(files / "alpha.png")
    m = np.asarray(load_mask(str(files / "alpha.png"), (32, 32))) > 127
    assert m.sum() == 36 and m[4:10, 4:10].all()


def test_batch_runs_move_jobs(cli, files, tiny_folder):
    manifest = files / "jobs.jsonl"
    manifest.write_text(json.dumps({"id": "m1", "command": "move", "image": "in.png", "mask": "mask.png", "dx": 4,
                                    "dy": 2, "model": str(tiny_folder("sd1"))}) + "\n")
    code, _, err = cli("batch", manifest, "--out-dir", files / "out", "-q")
    assert code == 0, err
    rows = [json.loads(line) for line in (files / "out" / "results.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "ok" and (files / "out" / "m1.png").exists()


def test_toy_model_moves_shapes(toy_model):
    """ShapesBench move tasks on the shipped toy model: the checker finds the object at its new place,
    with its shape and colour, and nothing where it was."""
    from lab.toy import bench

    tasks = {t["id"]: t for t in bench.load_tasks() if t["kind"] == "move"}
    for task_id in ("move-000", "move-003"):
        task = tasks[task_id]
        image, _ = bench.object_move(toy_model, task, Image.fromarray(bench.source_scene(task).image),
                                     {"engine": "pixelman"})
        assert bench.judge(task, np.asarray(image))["success"], task_id


@pytest.mark.parametrize("kind, rows", [("pag", 9), ("cfgpp", 6)])
def test_guidance_modules_compose_with_move(tiny, kind, rows):
    """PAG adds a perturbed chunk of [source, anchor, target] rows; CFG++ uses CFG's two chunks."""
    from diffedit.guidance import GuidanceSpec

    _, model = tiny("sd1")
    img, mask = scene()
    scale = 0.6 if kind == "cfgpp" else 4.0
    _, result = move_image(model, img, mask, MoveSpec(8, 8), prompt="a red square", guidance_scale=scale,
                           guidance=GuidanceSpec(kind, pag_layers=("down",)), energy=None)
    assert result["forwards"] == {rows: 16}


def test_mask_from_prompt_finds_the_object(toy_model):
    """The object found by its words on the move tasks' scenes: mean IoU with the true mask at least
    0.6 (measured 0.67: four of six objects exactly, two missed where the toy model's words attend to
    the background; cross-attention alone covered 0.59 of the object and 0.19 of the rest)."""
    from diffedit.editing.word_mask import mask_from_prompt
    from diffedit.errors import UsageError
    from lab.toy import bench

    ious = []
    tasks = [t for t in bench.load_tasks() if t["kind"] == "move"][:6]
    for task in tasks:
        sc = bench.source_scene(task)
        obj = sc.objects[0]
        found = mask_from_prompt(toy_model, to_tensor(Image.fromarray(sc.image)), task["source_prompt"],
                                 f"{obj.colour} {obj.shape}").numpy()
        ious.append((found & sc.masks[0]).sum() / (found | sc.masks[0]).sum())
    assert np.mean(ious) >= 0.6
    with pytest.raises(UsageError, match="not in the --prompt prompt"):
        mask_from_prompt(toy_model, to_tensor(Image.fromarray(sc.image)), task["source_prompt"], "zebra")


def test_cli_move_with_mask_from_prompt(cli, tmp_path):
    from lab.toy import bench

    task = next(t for t in bench.load_tasks() if t["id"] == "move-000")
    sc = bench.source_scene(task)
    Image.fromarray(sc.image).save(tmp_path / "scene.png")
    obj = sc.objects[0]
    code, stdout, err = cli("move", tmp_path / "scene.png", "--mask-from-prompt", obj.shape, "-p", task["source_prompt"],
                            "--dx", task["dx"], "--dy", task["dy"], "-o", tmp_path / "out.png", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["forwards"] == {"6": 16}  # the prompt turns CFG on
    code, _, err = cli("move", tmp_path / "scene.png", "--dx", "3", "-o", tmp_path / "x.png")
    assert code == 2 and "--mask" in err


def test_move_with_spm_adapters(cli, tmp_path):
    """Adapters reach every pass of a move: with the null prompt facilitated transport leaves the
    circle adapter off (same image), with a prompt naming circles it changes the result."""
    from diffedit.images import read_params
    from lab.toy import bench

    task = next(t for t in bench.load_tasks() if t["id"] == "move-001")  # a purple circle
    sc = bench.source_scene(task)
    Image.fromarray(sc.image).save(tmp_path / "scene.png")
    Image.fromarray(sc.masks[0].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    adapter = Path(__file__).resolve().parents[1] / "samples" / "toy-sd-spm" / "circle.spm.safetensors"
    outputs = {}
    for name, extra in {"plain": [], "null": ["--adapter", adapter],
                        "plain-prompt": ["-p", task["source_prompt"]],
                        "prompt": ["-p", task["source_prompt"], "--adapter", adapter]}.items():
        outputs[name] = tmp_path / f"{name}.png"
        code, _, err = cli("move", tmp_path / "scene.png", "--mask", tmp_path / "mask.png", "--dx", task["dx"],
                           "--dy", task["dy"], "-o", outputs[name], "-q", *extra)
        assert code == 0, err
    pixels = {k: np.asarray(Image.open(v)) for k, v in outputs.items()}
    assert np.array_equal(pixels["plain"], pixels["null"])
    assert not np.array_equal(pixels["plain-prompt"], pixels["prompt"])
    assert [a["concept"] for a in read_params(outputs["prompt"])["model"]["adapters"]] == ["circle"]
