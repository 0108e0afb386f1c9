"""Image input/output and safe writes; every input is made here, in tmp_path."""

from __future__ import annotations

import io
import math
import struct
import sys
import types
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from diffedit.errors import DiffeditError, UsageError
from diffedit.files import atomic_output, check_writable
from diffedit.images import Fit, load_image, psnr, read_params, save_image, to_pil, to_tensor


def error_for(fn, *args, name: str, **kwargs) -> str:
    """Run `fn`, expect a DiffeditError whose message is one line naming `name`; return the message."""
    with pytest.raises(DiffeditError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert name in msg
    return msg


def noise(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def fake_stream(data: bytes = b"") -> types.SimpleNamespace:
    return types.SimpleNamespace(buffer=io.BytesIO(data))


# --- load_image: bad files -------------------------------------------------------------------

def test_missing_file(tmp_path):
    error_for(load_image, tmp_path / "nope.png", name="nope.png")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    assert "not an image file" in error_for(load_image, p, name="notes.png")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    error_for(load_image, p, name="empty.png")


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    noise(64, 64).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in error_for(load_image, p, name="cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    noise(64, 64).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    error_for(load_image, p, name="cut.jpg")


def test_too_small(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(p)
    assert "1x1" in error_for(load_image, p, name="dot.png")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decompression_bomb_header(tmp_path):
    # A PNG whose header claims 100000 x 100000 pixels; it must be refused without decoding.
    p = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    assert "bomb" in error_for(load_image, p, name="bomb.png")


def test_pixel_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    msg = error_for(load_image, p, max_pixels=5000, name="big.png")
    assert "10000" in msg and "5000" in msg
    assert load_image(p, max_pixels=10_000).size == (100, 100)


def test_folder_is_not_an_image(tmp_path):
    error_for(load_image, tmp_path, name=tmp_path.name)


def test_unknown_alpha_policy(tmp_path):
    with pytest.raises(UsageError):
        load_image(tmp_path / "x.png", alpha="ignore")


# --- load_image: modes and metadata -------------------------------------------------------------

def test_cmyk_jpeg_red(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)
    img = load_image(p)
    assert img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert r > 245 and g < 10 and b < 10


def test_16bit_grey_png_full_range(tmp_path):
    p = tmp_path / "grey16.png"
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    a = np.asarray(load_image(p))
    assert a.dtype == np.uint8 and a.shape == (8, 256, 3)
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert abs(int(a[0, 128, 0]) - 128) <= 1  # scaled, not clipped
    assert (a[..., 0] == a[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16bit_tiff_modes(tmp_path, mode):
    p = tmp_path / "grey16.tif"
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    img = Image.frombytes("I;16B", (64, 8), ramp.astype(">u2").tobytes())
    (img if mode == "I;16B" else img.convert("I")).save(p)
    assert Image.open(p).mode == mode
    a = np.asarray(load_image(p))
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255 and abs(int(a[0, 32, 0]) - 130) <= 1


def test_16bit_rgb_png(tmp_path):
    p = tmp_path / "rgb16.png"
    bgr = np.zeros((8, 8, 3), np.uint16)
    bgr[..., 2] = 65535  # red
    bgr[..., 1] = 32896  # half green
    assert cv2.imwrite(str(p), bgr)
    r, g, b = np.asarray(load_image(p))[0, 0]
    assert (r, b) == (255, 0) and abs(int(g) - 128) <= 1


def test_rgba_composite_on_white(tmp_path):
    p = tmp_path / "half.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(p)
    r, g, b = np.asarray(load_image(p))[0, 0].astype(int)
    assert r == 255 and abs(g - 128) <= 1 and abs(b - 128) <= 1


def test_rgba_refused(tmp_path):
    p = tmp_path / "half.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(p)
    assert "alpha channel" in error_for(load_image, p, alpha="refuse", name="half.png")


def test_opaque_alpha_is_not_refused(tmp_path):
    p = tmp_path / "opaque.png"
    Image.new("RGBA", (16, 16), (10, 20, 30, 255)).save(p)
    assert load_image(p, alpha="refuse").getpixel((0, 0)) == (10, 20, 30)


def test_palette_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (8, 0, 16, 16))  # right half: palette entry 1, transparent
    img.save(p, transparency=1)
    out = load_image(p)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((15, 0)) == (255, 255, 255)


def test_greyscale_and_la(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (48, 24), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (24, 48)
    assert out.getpixel((out.width - 3, 2))[0] > 200  # the block is now top-right
    assert out.getpixel((2, 2))[2] > 200


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).getpixel((0, 0)) == (255, 0, 0)


def test_stdin(tmp_path, monkeypatch):
    buf = io.BytesIO()
    noise(16, 16).save(buf, format="PNG")
    monkeypatch.setattr(sys, "stdin", fake_stream(buf.getvalue()))
    assert np.array_equal(np.asarray(load_image("-")), np.asarray(noise(16, 16)))


def test_stdin_errors(monkeypatch):
    monkeypatch.setattr(sys, "stdin", fake_stream(b""))
    error_for(load_image, "-", name="<stdin>")
    monkeypatch.setattr(sys, "stdin", fake_stream(b"hello"))
    assert "not an image" in error_for(load_image, "-", name="<stdin>")


# --- Fit: to the model's multiple and back ------------------------------------------------------

def fit(img, multiple, policy="pad"):
    return Fit.of(img.size, multiple, policy).apply(img)


def test_fit_resize():
    assert fit(noise(30, 20), 8, "resize").size == (32, 24)
    assert fit(noise(3, 20), 8, "resize").size == (8, 24)  # never below one multiple


def test_fit_crop_is_centred():
    img = noise(30, 20)
    out = fit(img, 8, "crop")
    assert out.size == (24, 16)
    assert np.array_equal(np.asarray(out), np.asarray(img)[2:18, 3:27])


def test_fit_pad_replicates_edges():
    img = noise(30, 20)
    out = fit(img, 16, "pad")
    a, b = np.asarray(out), np.asarray(img)
    assert out.size == (32, 32)
    assert np.array_equal(a[:20, :30], b)
    assert np.array_equal(a[:20, 31], b[:, 29]) and np.array_equal(a[31, :30], b[19])


def test_fit_unchanged_and_errors():
    img = noise(32, 16)
    for policy in ("resize", "crop", "pad"):
        assert fit(img, 8, policy) is img and not Fit.of(img.size, 8, policy).changed
    with pytest.raises(UsageError):
        fit(img, 8, "stretch")
    with pytest.raises(DiffeditError):
        fit(noise(10, 10), 16, "crop")


@pytest.mark.parametrize("size", [(100, 77), (333, 517), (31, 9)])
@pytest.mark.parametrize("policy", ["pad", "resize", "crop"])
def test_fit_undo_returns_the_input_size(size, policy):
    """Whatever the policy, a result on the canvas comes back at the image's own size; pad gives the very
    pixels back, crop the cut centre with its border filled from the edge."""
    img = noise(*size)
    f = Fit.of(img.size, 8, policy)
    canvas = f.apply(img)
    assert canvas.width % 8 == 0 and canvas.height % 8 == 0 and f.changed
    back = f.undo(canvas)
    assert back.size == size
    a, b = np.asarray(back), np.asarray(img)
    if policy == "pad":
        assert np.array_equal(a, b)
    if policy == "crop":
        (x, y), (w, h) = f.offset, f.canvas
        assert np.array_equal(a[y : y + h, x : x + w], b[y : y + h, x : x + w])
        assert np.array_equal(a[:y, x : x + w], np.broadcast_to(b[y, x : x + w], a[:y, x : x + w].shape))
    mask = Image.new("L", size, 0)
    assert f.undo(f.apply(mask, Image.Resampling.NEAREST), Image.Resampling.NEAREST).size == size


# --- tensors and psnr -----------------------------------------------------------------------

def test_tensor_round_trip():
    img = noise(16, 8)
    t = to_tensor(img)
    assert t.shape == (1, 3, 8, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(to_pil(t)), np.asarray(img))
    clamped = to_pil(torch.tensor([-5.0, 5.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))
    assert clamped.getpixel((0, 0)) == (0, 255, 128)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(1, 4, 8, 8))
    with pytest.raises(DiffeditError):
        to_pil(torch.full((3, 8, 8), float("nan")))


def test_psnr():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255))
    assert psnr(Image.fromarray(a), Image.fromarray(a + 255)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        psnr(a, a[:4])


# --- writing --------------------------------------------------------------------------------

def test_save_refuses_to_overwrite(tmp_path):
    p = tmp_path / "out.png"
    save_image(noise(), p)
    before = p.read_bytes()
    assert "already exists" in error_for(save_image, noise(seed=1), p, name="out.png")
    assert p.read_bytes() == before
    save_image(noise(seed=1), p, overwrite=True)
    assert p.read_bytes() != before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"])
def test_save_formats(tmp_path, suffix):
    p = tmp_path / f"out{suffix}"
    save_image(noise(), p)
    assert load_image(p).size == (32, 24)


def test_save_bad_suffix_and_missing_folder(tmp_path):
    error_for(save_image, noise(), tmp_path / "out.bmp", name="out.bmp")
    msg = error_for(save_image, noise(), tmp_path / "no" / "out.png", name="out.png")
    assert "does not exist" in msg
    assert list(tmp_path.iterdir()) == []


def test_save_to_stdout(monkeypatch):
    out = fake_stream()
    monkeypatch.setattr(sys, "stdout", out)
    save_image(noise(), "-", params={"seed": 3})
    assert out.buffer.getvalue().startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.buffer.getvalue()))), np.asarray(noise()))


def test_params_round_trip(tmp_path):
    p = tmp_path / "out.png"
    params = {"engine": "ddim", "steps": 50, "prompt": "un chat — 猫", "seed": 7, "guidance": 7.5}
    save_image(noise(), p, params=params)
    assert read_params(p) == params
    save_image(noise(), tmp_path / "bare.png")
    assert read_params(tmp_path / "bare.png") is None


def test_atomic_output_success(tmp_path):
    p = tmp_path / "result.png"
    with atomic_output(p, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_bytes(b"done")
    assert p.read_bytes() == b"done"
    assert [x.name for x in tmp_path.iterdir()] == ["result.png"]


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    p = tmp_path / "result.png"
    with pytest.raises(RuntimeError):
        with atomic_output(p, overwrite=False) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_overwrite_error_keeps_old(tmp_path):
    p = tmp_path / "result.png"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(p, overwrite=True) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["result.png"]


def test_check_writable(tmp_path):
    p = tmp_path / "x.png"
    check_writable(p, overwrite=False)
    p.write_bytes(b"x")
    error_for(check_writable, p, False, name="x.png")
    check_writable(p, overwrite=True)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_parameters_travel_in_every_output_format_and_in_a1111_form(tmp_path, suffix):
    from diffedit.images import read_params, save_image

    params = {"command": "generate", "diffedit": "0.1.0", "prompt": "a red circle", "negative_prompt": "blur",
              "steps": 50, "guidance_scale": 7.5, "seed": 3, "size": {"width": 40, "height": 32},
              "model": {"source": "samples/toy-sd", "fingerprint": "abcdef1234567"}}
    path = tmp_path / f"out{suffix}"
    save_image(Image.new("RGB", (40, 32), (10, 20, 30)), path, params=params)
    assert read_params(path) == params
    with Image.open(path) as img:
        if suffix == ".png":  # A1111's "PNG Info" reads this text chunk
            text = img.info["parameters"]
        elif suffix in (".jpg", ".webp"):  # and this EXIF UserComment, UTF-16 after an 8-byte prefix
            raw = img.getexif().get_ifd(0x8769)[0x9286]
            assert raw[:8] == b"UNICODE\0"
            text = raw[8:].decode("utf-16-be")
        else:
            return
    prompt, negative, settings = text.split("\n")
    assert prompt == "a red circle" and negative == "Negative prompt: blur"
    assert "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 40x32, Model hash: abcdef1234" in settings
