"""The command line end to end: invert -> reconstruct, JSON, pipes, overwrite, bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import run_subprocess
from PIL import Image

from diffedit.images import load_image, psnr, read_params


def scene(path, size=(40, 32), mode="RGB"):
    a = np.full((size[1], size[0], 3), 230, np.uint8)
    a[4:16, 6:20] = (220, 30, 30)
    img = Image.fromarray(a)
    img.convert(mode).save(path)
    return path


@pytest.fixture
def sd1(tiny_folder):
    return tiny_folder("sd1")


def test_invert_reconstruct_round_trip(cli, tmp_path, sd1):
    image = scene(tmp_path / "in.png")
    record = tmp_path / "in.inv.safetensors"
    code, out, err = cli("invert", image, "-m", sd1, "--steps", 8, "-p", "a red square", "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    for key in ("output", "engine", "steps", "nfe", "seconds", "psnr", "latent_max_abs"):
        assert key in result
    assert result["output"] == str(record) and record.exists()
    assert result["nfe"] == 16 and result["engine"] == "ddim"

    code, out, err = cli("reconstruct", record, "-o", tmp_path / "back.png", "--json", "-q")
    assert code == 0, err
    rec = json.loads(out)
    # reconstruct repeats the round trip invert measured, against the same input image (found by the record)
    assert rec["latent_max_abs"] == pytest.approx(result["latent_max_abs"], rel=1e-5)
    assert rec["psnr"] == pytest.approx(result["psnr"]) and rec["vae_psnr"] == pytest.approx(result["vae_psnr"])
    assert rec["psnr_vs_vae"] > rec["psnr"]  # the regeneration is nearer the VAE's picture than the photo
    image.rename(tmp_path / "moved.png")  # without the image: no psnr, and a note that says why
    code, out, err = cli("reconstruct", record, "-o", tmp_path / "b2.png", "--json", "-q")
    assert code == 0 and "psnr" not in json.loads(out) and "is not there" in json.loads(out)["note"]
    code, out, err = cli("reconstruct", record, "-o", tmp_path / "b3.png", "--json", "-q", "--against",
                         tmp_path / "moved.png")
    assert code == 0 and json.loads(out)["psnr"] == pytest.approx(result["psnr"])
    Image.new("RGB", (40, 32), (0, 200, 0)).save(tmp_path / "other.png")
    code, _, err = cli("reconstruct", record, "-o", tmp_path / "b4.png", "-q", "--against", tmp_path / "other.png")
    assert code == 1 and "not the image" in err
    back = load_image(tmp_path / "back.png")
    assert back.size == (40, 32)
    params = read_params(tmp_path / "back.png")
    assert params["command"] == "reconstruct" and params["prompt"] == "a red square"


@pytest.mark.parametrize("fam", ["sd2", "sdxl", "sd3", "flux"])
def test_invert_reports_error_on_every_family(cli, tmp_path, tiny_folder, fam):
    image = scene(tmp_path / "in.png", size=(32, 32))
    code, out, err = cli("invert", image, "-m", tiny_folder(fam), "--steps", 4, "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert np.isfinite(result["latent_max_abs"]) and result["latent_max_abs"] > 0
    assert result["nfe"] == 8


def test_generate_json_and_png_params(cli, tmp_path, sd1):
    code, out, err = cli("generate", "a red cat", "-m", sd1, "-o", tmp_path / "g.png", "--seed", 5,
                         "--steps", 3, "-W", 32, "-H", 24, "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["seed"] == 5 and result["nfe"] == 3
    assert Image.open(tmp_path / "g.png").size == (32, 24)
    assert read_params(tmp_path / "g.png")["seed"] == 5
    # same seed, same image
    code, *_ = cli("generate", "a red cat", "-m", sd1, "-o", tmp_path / "g2.png", "--seed", 5, "--steps", 3,
                   "-W", 32, "-H", 24, "-q")
    assert code == 0
    assert psnr(load_image(tmp_path / "g.png"), load_image(tmp_path / "g2.png")) == float("inf")


def test_no_overwrite_keeps_first_output(cli, tmp_path, sd1):
    image = scene(tmp_path / "in.png")
    assert cli("invert", image, "-m", sd1, "--steps", 2, "-q")[0] == 0
    record = tmp_path / "in.inv.safetensors"
    before = record.read_bytes()
    code, out, err = cli("invert", image, "-m", sd1, "--steps", 3, "-q")
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert record.read_bytes() == before
    assert cli("invert", image, "-m", sd1, "--steps", 3, "-q", "--overwrite")[0] == 0
    assert record.read_bytes() != before


def test_pipes_stdin_and_stdout(tmp_path, sd1):
    """The real entry point: image on stdin, record to a file, image on stdout, result on stderr."""
    buf = io.BytesIO()
    Image.open(scene(tmp_path / "in.png")).save(buf, format="PNG")
    record = tmp_path / "piped.inv.safetensors"
    done = run_subprocess(["invert", "-", "-m", sd1, "--steps", 3, "-o", record, "--json", "-q"], stdin=buf.getvalue())
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["output"] == str(record)
    done = run_subprocess(["reconstruct", record, "-o", "-", "-q"])
    assert done.returncode == 0, done.stderr.decode()
    assert Image.open(io.BytesIO(done.stdout)).size == (40, 32)
    assert b"psnr_vs_vae=" in done.stderr  # results go to stderr when stdout carries the image
    assert b"no psnr against the input" in done.stderr  # the input came from stdin: nothing to compare with


def test_usage_error_exit_code_2(tmp_path):
    done = run_subprocess(["invert"])
    assert done.returncode == 2


# -- bad inputs: one line naming the file, exit code 1, no output left ------------------------------


def truncated_png(path):
    scene(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def text_as_png(path):
    path.write_text("this is not an image\n")


def one_pixel(path):
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)


def bomb(path):
    # A valid PNG header claiming 100000 x 100000 pixels: refused before anything is decoded.
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,name,message", [
    (truncated_png, "cut.png", "truncated"),
    (text_as_png, "notes.png", "not an image"),
    (one_pixel, "dot.png", "1x1"),
    (bomb, "bomb.png", "decompression bomb"),
])
def test_bad_images(cli, tmp_path, sd1, make, name, message):
    make(tmp_path / name)
    out = tmp_path / "out.inv.safetensors"
    code, stdout, err = cli("invert", tmp_path / name, "-m", sd1, "--steps", 2, "-o", out, "-q")
    assert code == 1
    assert err.count("\n") == 1 and name in err and message in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp files either


def cmyk_jpeg(path):
    Image.new("CMYK", (40, 32), (0, 255, 255, 0)).save(path)  # pure red in CMYK


def sixteen_bit_png(path):
    Image.fromarray(np.full((32, 40), 40000, np.uint16)).save(path)


def rgba_png(path):
    Image.new("RGBA", (40, 32), (255, 0, 0, 128)).save(path)


def exif_rotated_jpeg(path):
    img = Image.new("RGB", (40, 32), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(path, exif=exif)


@pytest.mark.parametrize("make,name,size", [
    (cmyk_jpeg, "cmyk.jpg", (40, 32)),
    (sixteen_bit_png, "deep.png", (40, 32)),
    (rgba_png, "alpha.png", (40, 32)),
    (exif_rotated_jpeg, "turned.jpg", (32, 40)),
])
def test_odd_but_valid_images_are_converted(cli, tmp_path, sd1, make, name, size):
    make(tmp_path / name)
    out = tmp_path / "out.inv.safetensors"
    code, stdout, err = cli("invert", tmp_path / name, "-m", sd1, "--steps", 2, "-o", out, "-q", "--json")
    assert code == 0, err
    assert json.loads(stdout)["size"] == {"width": size[0], "height": size[1]}


def test_alpha_refused_on_request(cli, tmp_path, sd1):
    rgba_png(tmp_path / "alpha.png")
    code, _, err = cli("invert", tmp_path / "alpha.png", "-m", sd1, "--alpha", "refuse", "-q")
    assert code == 1 and "alpha.png" in err and "alpha" in err


def test_missing_model(cli, tmp_path):
    scene(tmp_path / "in.png")
    code, _, err = cli("invert", tmp_path / "in.png", "-m", tmp_path / "nowhere", "-q")
    assert code == 1 and "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "in.inv.safetensors").exists()


def test_pickled_checkpoint_refused(cli, tmp_path):
    """A pickled single file is never read, --allow-pickle or not (that option is for model folders), so
    the message does not suggest it."""
    scene(tmp_path / "in.png")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really a pickle")
    for extra in ([], ["--allow-pickle"]):
        code, _, err = cli("invert", tmp_path / "in.png", "-m", tmp_path / "model.ckpt", "-q", *extra)
        assert code == 1 and "model.ckpt" in err and "must be .safetensors" in err and err.count("\n") == 1
        assert "--allow-pickle" not in err
    assert not (tmp_path / "in.inv.safetensors").exists()


def test_record_from_another_model(cli, tmp_path, tiny_folder):
    image = scene(tmp_path / "in.png")
    assert cli("invert", image, "-m", tiny_folder("sd1"), "--steps", 2, "-q")[0] == 0
    record = tmp_path / "in.inv.safetensors"
    code, _, err = cli("reconstruct", record, "-m", tiny_folder("sd1", seed=1), "-o", tmp_path / "x.png", "-q")
    assert code == 1 and "in.inv.safetensors" in err and "fingerprint" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_not_a_record(cli, tmp_path):
    (tmp_path / "fake.safetensors").write_bytes(b"garbage")
    code, _, err = cli("reconstruct", tmp_path / "fake.safetensors", "-o", tmp_path / "x.png", "-q")
    assert code == 1 and "fake.safetensors" in err and err.count("\n") == 1


def test_edit_help_shows_its_common_options_on_one_screen(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli("edit", "--help")
    lines = out.splitlines()
    panels = [i for i, line in enumerate(lines) if line.startswith("╭─")]
    titles = [lines[i].strip("╭─╮ ") for i in panels]
    assert titles[:3] == ["Arguments", "Options", "Engine options (each applies to the engines it names)"]
    assert panels[2] <= 40  # usage, arguments and the common options before the engine panel
    assert {"Guidance", "Model loading", "Input image"} <= set(titles)


def test_engine_help_names_every_engine(cli):
    from diffedit.inversion import engine_names

    for command in ("edit", "invert"):
        _, out, _ = cli(command, "--help")
        assert all(name in " ".join(out.split()) for name in engine_names()), command


def test_every_model_command_takes_the_same_model_options(cli, monkeypatch):
    from diffedit.cli.common import MODEL_OPTIONS

    monkeypatch.setenv("COLUMNS", "200")  # no option name cut short
    flags = {"--" + name.replace("_", "-") for name in MODEL_OPTIONS}
    for command in ("generate", "invert", "reconstruct", "edit", "move"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and all(flag in out for flag in flags), command


def test_a_pipe_chain_keeps_every_step_s_parameters(tmp_path, sd1):
    """generate | edit: the edited PNG carries the edit's parameters and, nested, the generation's."""
    made = run_subprocess(["generate", "a red square", "-m", sd1, "-n", 2, "--seed", 5, "-o", "-", "-q"])
    assert made.returncode == 0, made.stderr.decode()
    done = run_subprocess(["edit", "-", "-s", "a red square", "-t", "a blue square", "-m", sd1, "-n", 2,
                           "-o", tmp_path / "out.png", "-q"], stdin=made.stdout)
    assert done.returncode == 0, done.stderr.decode()
    params = read_params(tmp_path / "out.png")
    assert params["command"] == "edit" and params["made_from"]["command"] == "generate"
    assert params["made_from"]["seed"] == 5 and params["made_from"]["prompt"] == "a red square"


# -- outputs keep the input's size; JSON sizes name width and height ------------------------------------


def noise_png(path, size, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("size", [(100, 77), (333, 517)])
def test_odd_sizes_round_trip_at_the_input_size(cli, tmp_path, sd1, size):
    """The tiny models' multiple is 2: 100x77 and 333x517 are worked on padded (100x78, 334x518), and every
    output (reconstruct, edit, edit --from) comes back at the input's size, with one note on stderr."""
    image = noise_png(tmp_path / "in.png", size)
    w, h = size
    canvas = {"width": w + w % 2, "height": h + h % 2}
    code, out, err = cli("invert", image, "-m", sd1, "-n", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["size"] == {"width": w, "height": h} and result["canvas"] == canvas and result["fit"] == "pad"
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {w}x{h} is not a multiple of this model's size step: padded to "
                     f"{canvas['width']}x{canvas['height']} for the model, output at {w}x{h}"]
    record = tmp_path / "in.inv.safetensors"
    code, out, err = cli("reconstruct", record, "--json", "-q")
    assert code == 0 and err == "", err
    back = json.loads(out)
    assert Image.open(tmp_path / "in.reconstruct.png").size == size and back["size"] == result["size"]
    assert back["psnr"] == pytest.approx(result["psnr"])  # both against the photo, at its own size
    code, out, err = cli("edit", image, "-s", "a red square", "-t", "a blue square", "-m", sd1, "-n", 2, "-q",
                         "--json")
    assert code == 0, err
    assert Image.open(tmp_path / "in.edit.png").size == size and json.loads(out)["canvas"] == canvas
    code, _, err = cli("edit", "--from", record, "-t", "a blue square", "-o", tmp_path / "again.png", "-q")
    assert code == 0 and Image.open(tmp_path / "again.png").size == size, err


@pytest.mark.parametrize("policy", ["resize", "crop"])
def test_every_fit_policy_returns_the_input_size(cli, tmp_path, sd1, policy):
    image = noise_png(tmp_path / "in.png", (41, 33))
    code, out, err = cli("invert", image, "-m", sd1, "-n", 2, "--fit", policy, "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["fit"] == policy
    code, _, err = cli("reconstruct", tmp_path / "in.inv.safetensors", "-q")
    assert code == 0 and Image.open(tmp_path / "in.reconstruct.png").size == (41, 33), err


def test_generate_takes_any_width_and_height(cli, tmp_path, sd1):
    """-W 100 -H 77 (not multiples of the model's 2 px): sampled on 100x78 and cropped back to 100x77."""
    code, out, err = cli("generate", "a red cat", "-m", sd1, "-o", tmp_path / "g.png", "--seed", 1, "-n", 2,
                         "-W", 100, "-H", 77, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert Image.open(tmp_path / "g.png").size == (100, 77)
    assert result["size"] == {"width": 100, "height": 77} and result["canvas"] == {"width": 100, "height": 78}
    assert "padded to 100x78" in err
    params = read_params(tmp_path / "g.png")
    assert params["size"] == {"width": 100, "height": 77}
    assert "Size: 100x77" in Image.open(tmp_path / "g.png").info["parameters"]


def test_masks_follow_the_image_geometry(cli, tmp_path, sd1):
    """A mask of the input's odd size goes through the same padding: the output and --show-mask come back
    at 61x47, and outside the mask the output is the input's own pixels."""
    image = noise_png(tmp_path / "in.png", (61, 47))
    mask = np.zeros((47, 61), np.uint8)
    mask[10:30, 12:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, out, err = cli("edit", image, "-s", "a red square", "-t", "a blue square", "-m", sd1, "-n", 2,
                         "--mask", tmp_path / "mask.png", "--mask-feather", 0, "--show-mask", tmp_path / "shown.png",
                         "-o", tmp_path / "out.png", "-q")
    assert code == 0, err
    edited = np.asarray(Image.open(tmp_path / "out.png"))
    assert edited.shape == (47, 61, 3) and Image.open(tmp_path / "shown.png").size == (61, 47)
    keep = mask == 0
    assert np.array_equal(edited[keep], np.asarray(Image.open(image))[keep])


# -- --json on stdout; --json-out for a file --------------------------------------------------------------


def test_json_with_the_image_on_stdout_is_refused_in_one_line(cli, tmp_path, sd1):
    code, out, err = cli("generate", "a red cat", "-m", sd1, "-n", 2, "-o", "-", "--json")
    assert code == 2 and out == "" and "--json-out" in err and err.count("\n") == 1


def test_json_out_writes_the_result_beside_an_image_on_stdout(tmp_path, sd1):
    done = run_subprocess(["generate", "a red cat", "-m", sd1, "-n", 2, "--seed", 3, "-W", 24, "-H", 16, "-o", "-",
                           "--json-out", tmp_path / "result.json", "-q"])
    assert done.returncode == 0, done.stderr.decode()
    assert Image.open(io.BytesIO(done.stdout)).size == (24, 16) and done.stderr == b""
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["seed"] == 3 and result["output"] == "-" and result["size"] == {"width": 24, "height": 16}
    done = run_subprocess(["generate", "a red cat", "-m", sd1, "-n", 2, "-o", tmp_path / "g.png",
                           "--json-out", tmp_path / "result.json", "-q"])  # never over an existing file
    assert done.returncode == 1 and b"result.json: already exists" in done.stderr
    assert not (tmp_path / "g.png").exists()


# -- records name local files relative to themselves --------------------------------------------------------


def test_a_record_moved_with_its_model_and_image_still_finds_them(cli, tmp_path, sd1):
    import shutil

    from safetensors import safe_open

    first = tmp_path / "project"
    shutil.copytree(sd1, first / "models" / "tiny")
    image = scene(first / "in.png")
    record = first / "records" / "in.inv.safetensors"
    record.parent.mkdir()
    code, out, err = cli("invert", image, "-m", first / "models" / "tiny", "-n", 2, "-o", record, "--json", "-q")
    assert code == 0, err
    inverted = json.loads(out)
    with safe_open(str(record), framework="pt") as f:
        stored = json.loads(f.metadata()["diffedit"])
    assert stored["model"]["source"] == "../models/tiny" and stored["model"]["local"] is True
    assert stored["image"] == "../in.png" and str(tmp_path) not in json.dumps(stored)
    moved = tmp_path / "elsewhere"
    first.rename(moved)
    code, out, err = cli("reconstruct", moved / "records" / "in.inv.safetensors", "-o", tmp_path / "back.png",
                         "--json", "-q")
    assert code == 0, err  # no -m: the model was found beside the record
    assert json.loads(out)["psnr"] == pytest.approx(inverted["psnr"])  # and the image too
    (moved / "records" / "in.inv.safetensors").rename(tmp_path / "alone.safetensors")  # without its model
    code, _, err = cli("reconstruct", tmp_path / "alone.safetensors", "-o", tmp_path / "b2.png", "-q")
    assert code == 1 and "alone.safetensors: its model" in err and "--model" in err and err.count("\n") == 1
    code, _, err = cli("reconstruct", tmp_path / "alone.safetensors", "-m", moved / "models" / "tiny",
                       "-o", tmp_path / "b2.png", "-q")
    assert code == 0, err


def test_format_2_records_are_still_read(cli, tmp_path, sd1):
    """A record as diffedit wrote them before sizes were named: size [height, width], the model's path as
    given; read as it was made (its images at the canvas it was inverted on)."""
    from safetensors.torch import save_file

    from diffedit.records import checksum, load_record

    scene(tmp_path / "in.png")
    assert cli("invert", tmp_path / "in.png", "-m", sd1, "-n", 2, "-q")[0] == 0
    record = load_record(tmp_path / "in.inv.safetensors")
    meta = {k: v for k, v in record.meta.items() if k not in ("checksum", "canvas")}
    meta.update(format=2, size=[32, 40], image="in.png")
    meta["model"] = {k: v for k, v in meta["model"].items() if k != "local"}
    meta["checksum"] = checksum(meta, record.tensors)
    save_file(record.tensors, str(tmp_path / "old.safetensors"), metadata={"diffedit": json.dumps(meta)})
    code, out, err = cli("reconstruct", tmp_path / "old.safetensors", "-o", tmp_path / "old.png", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["size"] == {"width": 40, "height": 32} and Image.open(tmp_path / "old.png").size == (40, 32)
