"""A hostile user's inputs: outputs that are not plain files, absurd numbers, unexpected errors, batches
that collide with their own bookkeeping, with each other or with the user's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_subprocess


def _generate(model, output, *extra):
    return ["generate", "a red circle", "-m", model, "-n", "2", "--seed", "1", "-o", output, *extra]


# -- outputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dangling-symlink"])
def test_outputs_that_are_not_regular_files_are_refused_even_with_overwrite(cli, tmp_path, tiny_folder, kind):
    target = tmp_path / "target.png"
    target.write_bytes(b"keep me")
    out = tmp_path / "out.png"
    if kind == "symlink":
        out.symlink_to(target)
    elif kind == "dangling-symlink":
        out.symlink_to(tmp_path / "nowhere.png")
    else:
        os.mkfifo(out)
    code, _, err = cli(*_generate(tiny_folder("sd1"), out, "--overwrite"))
    assert code == 1 and "Traceback" not in err
    assert ("symbolic link" in err) if "symlink" in kind else ("not a regular file" in err)
    assert target.read_bytes() == b"keep me" and (out.is_symlink() or out.is_fifo())


def test_stale_temporary_files_are_cleaned_up_by_the_next_write(cli, tmp_path, tiny_folder):
    stale = tmp_path / ".old.png.0123abcd.tmp.png"  # what a SIGKILL during a write leaves
    fresh = tmp_path / ".other.png.89abcdef.tmp.png"  # a write that may still be running
    stale.write_bytes(b"x"), fresh.write_bytes(b"y")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    code, _, err = cli(*_generate(tiny_folder("sd1"), tmp_path / "new.png"))
    assert code == 0, err
    assert not stale.exists() and fresh.exists()


# -- numbers checked before anything loads ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["-g", "nan"], "not a guidance scale"),
    (["-g", "inf"], "not a guidance scale"),
    (["-g", "1e308"], "not a guidance scale"),
    (["--pag-scale", "nan", "--guidance", "pag"], "not a guidance scale"),
    (["-W", "100000", "-H", "8"], "-W"),
    (["-W", "16000", "-H", "16000"], "more than 64000000 pixels"),
])
def test_absurd_numbers_are_usage_errors_before_the_model_loads(cli, tmp_path, args, message):
    # the model does not exist: an option error must come first
    code, _, err = cli(*_generate(tmp_path / "no-such-model", tmp_path / "o.png", *args))
    assert code == 2, err
    assert message in err and "no-such-model" not in err
    assert not (tmp_path / "o.png").exists()


def test_seeds_up_to_two_to_the_64_work(cli, tmp_path, tiny_folder):
    code, out, err = cli(*_generate(tiny_folder("sd1"), tmp_path / "o.png", "--json"), "--seed", str(2**64 - 1))
    assert code == 0, err
    assert json.loads(out)["seed"] == 2**64 - 1


# -- the last resort --------------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_with_a_log_not_a_traceback(tmp_path, tiny_folder):
    """A bug (here: a record whose JSON header has an object where the engine's name belongs, a path
    no check covers yet) prints one line that says it is a bug and where the traceback went."""
    env = {"DIFFEDIT_LOG_DIR": str(tmp_path)}
    code = ("import sys; from diffedit.cli import main; import diffedit.jobs as jobs\n"
            "def broken(*a, **k): raise ZeroDivisionError('boom')\n"
            "jobs.generate_images = broken\n"
            "sys.exit(main.run(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, _generate(tiny_folder("sd1"), tmp_path / "o.png"))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "ZeroDivisionError: boom" in lines[0] and "this is a bug" in lines[0]
    logs = list(tmp_path.glob("diffedit-crash-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in lines[0]


# -- batches ----------------------------------------------------------------------------------------------


def _manifest(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def test_a_job_cannot_write_the_batch_bookkeeping(cli, tmp_path, tiny_folder):
    model = str(tiny_folder("sd1"))
    manifest = _manifest(tmp_path / "jobs.jsonl", [
        {"id": "evil", "command": "generate", "prompt": "a red circle", "model": model, "steps": 2,
         "output": "results.jsonl"},
        {"id": "fine", "command": "generate", "prompt": "a red circle", "model": model, "steps": 2}])
    code, _, err = cli("batch", manifest, "--out-dir", tmp_path / "out", "-q")
    assert code == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"] and "keeps for itself" in rows[0]["error"]
    code, _, err = cli("batch", manifest, "--out-dir", tmp_path / "out", "--resume", "-q")
    assert code == 3  # the bookkeeping still parses: the good job is not run again, the bad one fails again


def test_two_jobs_with_one_output_both_fail_before_anything_runs(cli, tmp_path, tiny_folder):
    model = str(tiny_folder("sd1"))
    job = {"command": "generate", "prompt": "a red circle", "model": model, "steps": 2, "output": "same.png"}
    manifest = _manifest(tmp_path / "jobs.jsonl", [{**job, "id": "a"}, {**job, "id": "b", "seed": 2}])
    code, _, _ = cli("batch", manifest, "--out-dir", tmp_path / "out", "-q")
    assert code == 3 and not (tmp_path / "out" / "same.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "failed" and "also written by job" in r["error"] for r in rows)


def test_a_batch_does_not_replace_a_file_it_did_not_write(cli, tmp_path, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(b"the user's own file")
    manifest = _manifest(tmp_path / "jobs.jsonl", [{"id": "j", "command": "generate", "prompt": "a red circle",
                                                     "model": str(tiny_folder("sd1")), "steps": 2,
                                                     "output": "mine.png"}])
    code, _, _ = cli("batch", manifest, "--out-dir", out, "-q")
    assert code == 3 and (out / "mine.png").read_bytes() == b"the user's own file"
    code, _, err = cli("batch", manifest, "--out-dir", out, "--resume", "--overwrite", "-q")
    assert code == 0, err
    assert (out / "mine.png").read_bytes() != b"the user's own file"


def test_a_second_batch_on_the_same_out_dir_fails_at_once(tmp_path, tiny_folder):
    model = str(tiny_folder("sd1"))
    manifest = _manifest(tmp_path / "jobs.jsonl", [
        {"id": f"j{i}", "command": "generate", "prompt": "a red circle", "model": model, "steps": 30, "seed": i}
        for i in range(6)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from diffedit.cli.main import main; main()", "batch", str(manifest),
           "--out-dir", str(out), "--resume", "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / ".diffedit-batch.lock").exists() or not (out / ".diffedit-batch.lock").read_text():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        started = time.perf_counter()
        second = run_subprocess(["batch", manifest, "--out-dir", out, "--resume", "-q"])
        assert second.returncode == 1
        assert f"another batch (PID {first.pid})" in second.stderr.decode()
        assert time.perf_counter() - started < 60  # refused at once, not after the first's jobs
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"j{i}" for i in range(6)]


# -- conventions --------------------------------------------------------------------------------------------


def test_version_and_short_help(cli):
    from diffedit import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"diffedit {__version__}"
    code, out, _ = cli("edit", "-h")
    assert code == 0 and "Usage" in out and "--mask" in out


def test_reading_stdin_from_a_terminal_fails_at_once(tmp_path):
    """`invert -` with nothing piped in would wait forever for the user to type an image."""
    main, terminal = os.openpty()
    try:
        done = subprocess.run([sys.executable, "-c", "from diffedit.cli.main import main; main()", "invert", "-",
                               "-o", str(tmp_path / "r.safetensors")], stdin=terminal, capture_output=True,
                              timeout=120)
    finally:
        os.close(main), os.close(terminal)
    assert done.returncode == 1 and b"standard input is a terminal" in done.stderr


# -- small lies ---------------------------------------------------------------------------------------------


def test_a_model_folder_missing_a_component_is_named(cli, tmp_path, tiny_folder):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), broken)
    shutil.rmtree(broken / "tokenizer")
    code, _, err = cli(*_generate(broken, tmp_path / "o.png"))
    assert code == 1 and "lists tokenizer, but the folder has no tokenizer/" in err and "bug" not in err


def test_nan_weights_in_full_precision_are_not_blamed_on_half_precision(cli, tmp_path):
    import torch

    from lab.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    pipe.save_pretrained(tmp_path / "nan-model", safe_serialization=True)
    code, _, err = cli(*_generate(tmp_path / "nan-model", tmp_path / "o.png", "--dtype", "fp32"))
    assert code == 1 and "weights may hold NaN/Inf" in err and "half" not in err
    assert not (tmp_path / "o.png").exists()


def test_a_batch_prompt_may_begin_with_a_dash(cli, tmp_path, tiny_folder):
    manifest = _manifest(tmp_path / "jobs.jsonl", [{"id": "dash", "command": "generate", "prompt": "-a red circle",
                                                    "model": str(tiny_folder("sd1")), "steps": 2}])
    code, _, err = cli("batch", manifest, "--out-dir", tmp_path / "out", "-q")
    assert code == 0, err
    from PIL import Image

    assert json.loads(Image.open(tmp_path / "out" / "dash.png").info["diffedit"])["prompt"] == "-a red circle"


def test_unknown_words_and_overlong_prompts_are_warned_about(cli, tmp_path):
    """On the toy model (a closed word vocabulary): a word it never saw, and a prompt past its 32 tokens."""
    out = tmp_path / "o.png"
    code, _, err = cli("generate", "a red zebra on a white background", "-n", "2", "-o", out)
    assert code == 0 and "knows no 'zebra'" in err
    code, _, err = cli("generate", "a red circle " * 20, "-n", "2", "-o", out, "--overwrite")
    assert code == 0 and "the text encoder reads the first 32" in err
    code, _, err = cli("generate", "a red zebra", "-n", "2", "-o", out, "--overwrite", "-q")
    assert code == 0 and "zebra" not in err  # -q: errors only
    code, _, err = cli("generate", "a red circle on a white background", "-n", "2", "-o", out, "--overwrite")
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "-n", "0", "-o", "o.png"], "'--steps' / '-n'"),
    (["generate"], "Missing argument 'prompt'"),
    (["gen"], "No such command 'gen'"),
    (["edit", "in.png", "--no-such-option"], "No such option"),
])
def test_usage_errors_are_one_line_too(cli, args, message):
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("error: ")
    assert "-h)" in lines[0]  # where to read on


def test_each_guidance_has_a_default_scale_that_runs(cli, tmp_path, tiny_folder):
    """`--guidance cfgpp` alone used to be refused (7.5, CFG's default, is no CFG++ lambda)."""
    from diffedit.images import read_params

    model = tiny_folder("sd1")
    for guidance, expected in (("cfg", 7.5), ("cfgpp", 0.6), ("pag", 7.5), ("cfgpp+pag", 0.6)):
        out = tmp_path / f"{guidance}.png"
        code, _, err = cli("generate", "a red circle", "-m", model, "-n", "2", "--guidance", guidance, "-o", out, "-q")
        assert code == 0, err
        assert read_params(out)["guidance_scale"] == expected
    image = tmp_path / "cfg.png"
    code, _, err = cli("edit", image, "-s", "a red circle", "-t", "a blue circle", "-m", model, "-n", "2",
                       "-e", "ddpm-ef", "--guidance", "cfgpp", "-o", tmp_path / "e.png", "-q")
    assert code == 0, err
    params = read_params(tmp_path / "e.png")
    assert params["guidance_scale"] == 0.6 and params["inversion_guidance_scale"] == 0.6  # ddpm-ef: 15 and 3.5


@pytest.mark.parametrize("args", [["edit", "nope.png", "-t", "x"], ["invert", "nope.png"], ["reconstruct", "nope.rec"],
                                  ["move", "nope.png", "--mask", "m.png", "--dx", "1"], ["generate", "x", "-n", "0"],
                                  ["mask", "nope.png", "-p", "a", "-w", "a", "-o", "m.png"],
                                  ["generate", "x", "-o", "-", "--json"]])
def test_typos_are_answered_before_torch_is_imported(tmp_path, args):
    """A missing file or a bad option is answered without importing torch or diffusers (tens of seconds
    on a busy machine): 0.30-0.40 s for the whole process here (docs/testing-and-benchmarks.md); the
    bound is generous for loaded CI machines, the import check is the strict part."""
    code = ("import sys; from diffedit.cli import main; rc = main.run(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)); sys.exit(rc)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert time.perf_counter() - started < 10
    assert done.returncode in (1, 2) and done.stderr.startswith("error: ")
    assert done.stdout.strip() == "[]"


def test_default_outputs_follow_one_naming_rule(cli, tmp_path, tiny_folder, monkeypatch):
    """Beside the input, STEM.COMMAND.png (records STEM.inv.safetensors); generate: PROMPT-SLUG-SEED.png."""
    from PIL import Image

    model = tiny_folder("sd1")
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 20, 20))
    mask.save(tmp_path / "m.png")
    steps = ["-m", model, "-n", "2", "-q"]
    assert cli("invert", image, *steps)[0] == 0 and (tmp_path / "photo.inv.safetensors").exists()
    assert cli("reconstruct", tmp_path / "photo.inv.safetensors", "-q")[0] == 0
    assert (tmp_path / "photo.reconstruct.png").exists()
    assert cli("edit", image, "-t", "a blue square", *steps)[0] == 0 and (tmp_path / "photo.edit.png").exists()
    code, _, err = cli("edit", image, "-t", "a blue square", *steps)  # a second run does not replace it
    assert code == 1 and "photo.edit.png: already exists" in err
    assert cli("move", image, "--mask", tmp_path / "m.png", "--dx", "4", "--dy", "0", *steps)[0] == 0
    assert (tmp_path / "photo.move.png").exists()
    code, out, err = cli("generate", "A red circle, on white!", "--seed", "7", *steps)
    assert code == 0 and (tmp_path / "a-red-circle-on-white-7.png").exists()
    code, _, err = cli("edit", "-", "-t", "x", *steps)
    assert code == 2 and "give the output with -o" in err


# -- defaults that work on the model they run on --------------------------------------------------------------


def test_a_model_folder_s_recommended_settings_are_the_defaults(cli, tmp_path, tiny_folder, square):
    """A folder's diffedit.json (here: Direct Inversion at CFG 3 with feature injection 0.4, as the toy
    model v1 had) applies unless the user says otherwise; the result and the PNG say where the
    defaults came from."""
    import shutil

    from diffedit.images import read_params

    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"engines": {"direct": {"guidance_scale": 3.0, "inject_features": 0.4}}}))
    edit = ("edit", square, "-s", "a red square", "-t", "a blue square", "-m", model, "-n", "4", "--json", "-q")
    code, out, err = cli(*edit, "-e", "direct", "-o", tmp_path / "a.png")
    assert code == 0, err
    params = read_params(tmp_path / "a.png")
    assert params["guidance_scale"] == 3.0 and params["engine_params"]["inject_features"] == 0.4
    assert json.loads(out)["defaults"].endswith("model/diffedit.json")
    code, out, err = cli(*edit, "-e", "direct", "-g", "5", "--inject-features", "0", "-o", tmp_path / "b.png")
    assert code == 0, err
    params = read_params(tmp_path / "b.png")
    assert params["guidance_scale"] == 5.0 and params["engine_params"]["inject_features"] == 0.0
    assert json.loads(out)["defaults"] == "paper"  # everything the folder recommends was given
    code, out, err = cli(*edit, "-e", "ddim", "-o", tmp_path / "c.png")
    assert code == 0 and json.loads(out)["defaults"] == "paper"  # nothing recommended for ddim


def test_a_folder_setting_that_follows_another_option_yields_to_the_user_s_value_of_it(cli, tmp_path, tiny_folder, square):
    """The toy folder pairs cross 0.8 with the swapped word's 0.6; a user's --cross-replace 0.4 then holds
    for the swapped word too (the option's documented default), not the folder's 0.6 chosen for 0.8."""
    import shutil

    from diffedit.images import read_params

    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"engines": {"direct": {"cross_replace": 0.8, "cross_replace_edited": 0.6}}}))
    edit = ("edit", square, "-s", "a red square", "-t", "a blue square", "-m", model, "-n", "2", "-e", "direct", "-q")
    for n, (given, expected) in enumerate((((), (0.8, 0.6)), (("--cross-replace", "0.4"), (0.4, None)),
                                           (("--cross-replace", "0.4", "--cross-replace-edited", "0.2"), (0.4, 0.2)))):
        code, _, err = cli(*edit, *given, "-o", tmp_path / f"e{n}.png")
        assert code == 0, err
        engine = read_params(tmp_path / f"e{n}.png")["engine_params"]
        assert (engine["cross_replace"], engine["cross_replace_edited"]) == expected, given


def test_move_takes_the_recommended_energy_scale_and_models_info_lists_it(cli, tmp_path):
    code, out, err = cli("move", "samples/scene.png", "--mask", "samples/scene.star-mask.png", "--dx", "4",
                         "--dy", "0", "-n", "2", "-o", tmp_path / "m.png", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["energy_scale"] == 4.0
    code, out, err = cli("models", "info", "samples/toy-sd", "--json")
    assert code == 0 and json.loads(out)["recommended"]["move"] == {"energy_scale": 4.0}


def test_a_broken_settings_file_is_named(cli, tmp_path, tiny_folder):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder("sd1"), model)
    (model / "diffedit.json").write_text(json.dumps({"engines": {"ddim": {"skip": 3}}}))
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    code, _, err = cli("edit", tmp_path / "x.png", "-t", "a", "-m", model, "-n", "2", "-o", tmp_path / "o.png", "-q")
    assert code == 2 and "diffedit.json: --skip does not apply to engine ddim" in err
    (model / "diffedit.json").write_text("[1, 2]")
    code, _, err = cli("edit", tmp_path / "x.png", "-t", "a", "-m", model, "-n", "2", "-o", tmp_path / "o.png", "-q")
    assert code == 1 and "diffedit.json: expected" in err


SCENE_SOURCE = "an orange star and a green triangle on a black background"
SCENE_TARGET = "a yellow star and a green triangle on a black background"


@pytest.mark.parametrize("model, engine, guidance", [
    *(("samples/toy-sd", e, "cfg") for e in ("ddim", "ddpm-ef", "bdia", "direct", "ddim-p2p", "infedit")),
    *(("samples/toy-sd", "ddim", g) for g in ("cfgpp", "pag", "cfgpp+pag")),
    *(("samples/toy-flow", e, "cfg") for e in ("ddim", "rf-inversion", "flowedit")),
])
def test_defaults_never_fail(cli, tmp_path, model, engine, guidance):
    """Every engine and every guidance with nothing but its defaults, on the shipped toy models."""
    code, out, err = cli("edit", "samples/scene.png", "-s", SCENE_SOURCE, "-t", SCENE_TARGET, "-m", model,
                         "-e", engine, "--guidance", guidance, "-o", tmp_path / "e.png", "--json", "-q")
    assert code == 0, err
    assert (tmp_path / "e.png").exists() and json.loads(out)["nfe"] > 0


@pytest.mark.parametrize("command", ["generate", "invert", "move", "mask"])
def test_every_other_command_runs_on_its_defaults(cli, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").symlink_to(Path(__file__).resolve().parent.parent / "samples")
    args = {"generate": ["generate", "a red circle on a white background"],
            "invert": ["invert", "samples/scene.png", "-o", "r.safetensors"],
            "move": ["move", "samples/scene.png", "--mask", "samples/scene.star-mask.png", "--dx", "6", "-o", "m.png"],
            "mask": ["mask", "samples/scene.png", "-p", SCENE_SOURCE, "-w", "orange star", "-o", "k.png"]}[command]
    code, _, err = cli(*args, "-q")
    assert code == 0, err
