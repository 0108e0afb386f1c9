"""The toy world: generator, checker, ShapesBench task file and judging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffedit.toy.checker import check, shows
from diffedit.toy.shapes import COLOURS, SHAPES, VOCAB, Obj, make_scene, named_objects, render, user_caption
from lab.toy.bench import (
    HELD_OUT,
    TASKS,
    expected_scene,
    judge,
    load_tasks,
    make_held_out_tasks,
    make_tasks,
    source_scene,
)
from lab.toy.model import make_tokenizer


def test_generator_is_deterministic():
    a, b, c = make_scene(42), make_scene(42), make_scene(43)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert all(m.any() for m in a.masks)


def test_generator_covers_the_world():
    seen_shapes, seen_colours, counts = set(), set(), set()
    for seed in range(200):
        scene = make_scene(seed)
        counts.add(len(scene.objects))
        for obj in scene.objects:
            seen_shapes.add(obj.shape)
            seen_colours.add(obj.colour)
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS) and counts == {1, 2, 3}


def test_object_counts_set_the_share_of_each_count_and_keep_scenes_of_a_kept_count():
    def counts(chances):
        return [len(make_scene(seed, object_counts=chances).objects) for seed in range(400)]

    default, more_pairs = counts((0.5, 0.3, 0.2)), counts((0.2, 0.6, 0.2))
    assert default == [len(make_scene(seed).objects) for seed in range(400)]
    assert more_pairs.count(2) > 1.5 * default.count(2) and more_pairs.count(1) < 0.6 * default.count(1)
    assert set(counts((0.0, 1.0, 0.0))) == {2}
    # one draw of the count either way: a scene whose count did not change is the same scene
    same = [seed for seed, (a, b) in enumerate(zip(default, more_pairs)) if a == b]
    assert same and all(make_scene(seed).caption == make_scene(seed, object_counts=(0.2, 0.6, 0.2)).caption
                        for seed in same[:50])


def test_checker_reads_generated_scenes():
    right = total = 0
    for seed in range(300):
        scene = make_scene(seed)
        found = check(scene.image)
        for obj in scene.objects:
            total += 1
            near = [d for d in found if math.dist(d.centroid, obj.center) < 3]
            right += bool(near) and near[0].shape == obj.shape and near[0].colour == obj.colour
    assert right / total >= 0.99


def test_checker_on_a_bigger_image_and_helpers():
    scene = render([Obj("star", "purple", (64, 64), 40), Obj("square", "yellow", (180, 180), 30)], ("grey",), 256)
    found = check(scene.image)
    assert {(d.shape, d.colour) for d in found} == {("star", "purple"), ("square", "yellow")}
    assert shows(scene.image, shape="star") and not shows(scene.image, colour="red")


def test_every_caption_word_is_one_token():
    tokenizer = make_tokenizer()
    for word in VOCAB:
        assert len(tokenizer.tokenize(word)) == 1
    caption = make_scene(3).caption
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2


def test_shapesbench_file_is_the_fixed_task_list():
    tasks = load_tasks()
    assert tasks == make_tasks()  # regenerating gives the same file: the benchmark is versioned and fixed
    kinds = {t["kind"] for t in tasks}
    assert {"recolour", "reshape", "move", "reconstruct", "erase"} <= kinds
    assert len({t["id"] for t in tasks}) == len(tasks)


def test_held_out_tasks_are_fixed_and_on_scenes_shapesbench_never_shows():
    """Settings tuned on ShapesBench are checked on the held-out file: same kinds, other scenes."""
    held_out, tasks = load_tasks(HELD_OUT), load_tasks()
    assert held_out == make_held_out_tasks()
    assert not {t["scene_seed"] for t in held_out} & {t["scene_seed"] for t in tasks}
    images = [{source_scene(t).image.tobytes() for t in file} for file in (held_out, tasks)]
    assert not images[0] & images[1]  # nor any scene drawn alike
    counts = {kind: sum(t["kind"] == kind for t in held_out) for kind in ("recolour", "reshape", "move")}
    assert counts == {"recolour": 40, "reshape": 40, "move": 32}
    assert sum(t["id"].startswith("heldout-move-white-") for t in held_out) == 12
    assert all(t["id"].startswith("heldout-") for t in held_out) and len({t["id"] for t in held_out}) == len(held_out)


@pytest.mark.parametrize("index", [0, 45, 85, 105])
def test_judging_tells_success_from_failure(index):
    task = load_tasks()[index]
    good = judge(task, expected_scene(task).image)
    assert good["success"]
    if task["kind"] != "reconstruct":
        assert not judge(task, source_scene(task).image)["success"]
    assert good["bg_psnr"] == math.inf or good["bg_psnr"] > 40


def test_judging_erase_tasks():
    """Erase: success when the concept is gone and the other object stays; the source itself fails."""
    from diffedit.toy.shapes import with_object

    for task in [t for t in load_tasks() if t["kind"] == "erase"][:2]:
        scene = source_scene(task)
        assert not judge(task, scene.image)["success"]
        change = {"colour": "blue"} if task["concept"] in COLOURS else {"shape": "square"}
        assert judge(task, with_object(scene, task["object"], **change).image)["success"]
        assert not judge(task, with_object(scene, 1, **change).image)["success"]  # the concept still there


def test_task_file_versions_are_checked(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"id": "x", "version": 99, "kind": "recolour"}) + "\n")
    from diffedit.errors import DiffeditError

    with pytest.raises(DiffeditError, match="newer diffedit"):
        load_tasks(path)
    assert TASKS.name == "shapesbench.jsonl"


def test_bench_shapes_rows_name_the_settings_they_ran_with(cli, tmp_path):
    """`diffedit bench shapes`: one row per task, saved as they come; a run given its own guidance or
    engine parameters is its own row group, so tables that merge runs keep them apart."""
    code, out, err = cli("bench", "shapes", "-e", "copy-paste", "--kinds", "move", "--limit", "2", "--save", tmp_path / "a")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "a" / "rows.jsonl").read_text().splitlines()]
    assert [r["engine"] for r in rows] == ["copy-paste"] * 2 and not any(r["success"] for r in rows)  # the object stays behind
    code, out, err = cli("bench", "shapes", "-e", "copy-paste", "--kinds", "move", "--limit", "1", "-g", "3",
                         "--param", "seed=4", "--save", tmp_path / "b")
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [s["engine"] for s in summary] == ["copy-paste (CFG 3, seed 4)"]
    assert "| copy-paste (CFG 3, seed 4) | move | 1 |" in (tmp_path / "b" / "results.md").read_text()
    code, out, err = cli("bench", "shapes", "-e", "copy-paste", "--kinds", "move", "--limit", "1", "--tasks", HELD_OUT,
                         "--save", tmp_path / "c")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "c" / "rows.jsonl").read_text().splitlines()]
    assert [(r["id"], r["engine"]) for r in rows] == [("heldout-move-000", "copy-paste (tasks: shapesbench-heldout.jsonl)")]


def test_bench_shapes_rows_say_when_the_model_folder_s_settings_applied(cli, tmp_path, tiny_folder):
    """A row run with the model folder's diffedit.json filling in what the command left unset says so;
    one whose command set everything the folder recommends does not, nor one of a kind the settings do
    not reach. Each results folder records the command and the options given."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"engines": {"ddim": {"guidance_scale": 3.0}}}))
    run = ("bench", "shapes", "-e", "ddim", "-m", model, "--kinds", "recolour", "--limit", "1", "-n", "2")
    code, out, err = cli(*run, "--save", tmp_path / "a")
    assert code == 0, err
    assert [s["engine"] for s in json.loads((tmp_path / "a" / "results.json").read_text())] == ["ddim (folder settings)"]
    command = json.loads((tmp_path / "a" / "command.json").read_text())["command"]
    assert command == ["diffedit", *map(str, run), "--save", str(tmp_path / "a")]
    code, out, err = cli(*run, "-g", "3", "--save", tmp_path / "b")
    assert code == 0, err
    assert [s["engine"] for s in json.loads((tmp_path / "b" / "results.json").read_text())] == ["ddim (CFG 3)"]
    assert json.loads((tmp_path / "b" / "command.json").read_text())["command"][-4:-2] == ["-g", "3"]
    # DDIM's move baseline takes nothing from the folder's ddim settings, so its row does not say so.
    code, out, err = cli("bench", "shapes", "-e", "ddim", "-m", model, "--kinds", "recolour,move", "--limit", "1", "-n", "2",
                         "--save", tmp_path / "c")
    assert code == 0, err
    summary = json.loads((tmp_path / "c" / "results.json").read_text())
    assert {s["kind"]: s["engine"] for s in summary} == {"recolour": "ddim (folder settings)", "move": "ddim"}


def test_layout_diagnostic_runs_on_the_task_file_it_is_given(cli, tiny_folder):
    """`diffedit toy layout --tasks`: the held-out recolours, named in the result."""
    code, out, err = cli("toy", "layout", "-m", tiny_folder("sd1"), "--tasks", HELD_OUT, "--limit", "2", "--steps", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tasks_file"] == HELD_OUT.name and result["tasks"] == 2 and len(result["shifts_px"]) == 2


@settings(max_examples=200, deadline=None)
@given(scene_seed=st.integers(0, 2**31 - 1), form_seed=st.integers(0, 2**31 - 1))
def test_user_captions_name_the_same_scene(scene_seed, form_seed):
    """A caption as people type it names the scene's objects, each once, with the right article or
    none, and the scene's own background phrase or none; every word is in the vocabulary."""
    scene = make_scene(scene_seed)
    text = user_caption(scene.caption, np.random.default_rng(form_seed))
    assert named_objects(text) == named_objects(scene.caption)
    things, on, background = text.partition(" on a ")
    assert not on or background == scene.caption.partition(" on a ")[2]
    for phrase in things.split(" and "):
        words = phrase.split()
        assert len(words) == 2 or (len(words) == 3 and words[0] == ("an" if words[1][0] in "aeiou" else "a"))
    assert set(text.split()) <= set(VOCAB)


def test_two_object_prompts_score_binding_not_only_presence():
    """`toy quality`'s two-object rows: a scene drawn as asked scores both right; the same scene with
    the two colours exchanged has every shape and colour but scores swapped, not right; one object
    missing scores neither."""
    from diffedit.toy.shapes import BACKGROUNDS
    from lab.toy.quality import pair_prompt_set, pair_scores

    prompts = pair_prompt_set(6, seed=1)
    assert prompts == pair_prompt_set(6, seed=1) and len(prompts) == 6
    for text, (a, b) in prompts:
        assert a.colour != b.colour and a.shape != b.shape
        assert {a.colour, a.shape, b.colour, b.shape} <= set(text.split())
    typed = pair_prompt_set(6, seed=1, forms="user")
    assert [objects for _, objects in typed] == [objects for _, objects in prompts]
    background = (list(BACKGROUNDS)[0],)
    for _, (a, b) in prompts:
        right = render([a, b], background).image
        exchanged = render([Obj(a.shape, b.colour, a.center, a.size), Obj(b.shape, a.colour, b.center, b.size)],
                           background).image
        assert pair_scores(right, [a, b]) == (True, False, True)
        assert pair_scores(exchanged, [a, b]) == (False, True, True)
        assert pair_scores(render([a], background).image, [a, b])[:2] == (False, False)
