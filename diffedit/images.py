"""Image input and output: any reasonable file in, 8-bit RGB out; safe writes with parameters attached."""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from diffedit.errors import DiffeditError, UsageError
from diffedit.files import atomic_output, check_readable

MIN_SIDE = 8
PARAMS_KEY = "diffedit"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "TIFF": {"compression": "tiff_deflate"}}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def load_image(
    source: str | Path, *, alpha: str = "composite", max_pixels: int = 64_000_000
) -> Image.Image:
    """Read an image file (or stdin for "-") as 8-bit RGB, upright, first frame only.

    alpha: "composite" puts transparent images on white, "refuse" rejects them, "as-mask" returns
    the alpha channel itself (a mask drawn as transparency).
    Images of more than `max_pixels` pixels are refused before decoding.
    """
    if alpha not in ("composite", "refuse", "as-mask"):
        raise UsageError(f"unknown alpha policy {alpha!r}; use composite or refuse")
    name, fp = _open_source(source)
    try:
        # Opening reads only the header; our own check below gives the clearer message.
        with _pillow_pixel_limit(None):
            img = Image.open(fp)
    except UnidentifiedImageError:
        raise DiffeditError(f"{name}: not an image file (unknown or unsupported format)") from None
    except OSError as e:
        raise DiffeditError(f"{name}: cannot read ({e.strerror or _one_line(e)})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise DiffeditError(
                f"{name}: image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
                "refusing to decode it (possible decompression bomb)"
            )
        try:
            # Decode now, so truncated or corrupt data fails here and not later; some decoders
            # check sizes again, against Pillow's limit, which we set to ours.
            with _pillow_pixel_limit(max_pixels):
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            msg = f"refused as a possible decompression bomb ({_one_line(e)})"
            raise DiffeditError(f"{name}: {msg}") from None
        except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
            kind = img.format or "image"
            raise DiffeditError(f"{name}: corrupt or truncated {kind} file ({_one_line(e)})") from None
        img = _upright(img)
        if min(img.size) < MIN_SIDE:
            raise DiffeditError(
                f"{name}: image is {img.width}x{img.height} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed"
            )
        return _to_rgb(img, alpha, name)


def load_mask(source: str | Path | Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask (file, or image in memory) as a black/white "L" image of the image's `size` (w, h):
    pixels above half grey select (or, in a file with transparency, opaque pixels)."""
    if isinstance(source, Image.Image):
        mask, source = source.convert("L"), "mask"
    else:
        mask = load_image(source, alpha="as-mask").convert("L")
    if mask.size != size:
        raise DiffeditError(f"{source}: mask is {mask.width}x{mask.height} pixels but the image is "
                            f"{size[0]}x{size[1]}; they must match")
    return mask.point(lambda v: 255 if v > 127 else 0)


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Set Pillow's global bomb limit for a moment, with its warning made an error."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_source(source: str | Path) -> tuple[str, io.BytesIO | Path]:
    if str(source) == "-":
        global _stdin_read
        if _stdin_read is None or _stdin_read[0] is not sys.stdin:  # read once: image and parameters
            if getattr(sys.stdin, "isatty", lambda: False)():  # nothing piped in: reading would wait forever
                raise DiffeditError("<stdin>: no image piped in (standard input is a terminal)")
            _stdin_read = (sys.stdin, sys.stdin.buffer.read())
        if not _stdin_read[1]:
            raise DiffeditError("<stdin>: no data on standard input")
        return "<stdin>", io.BytesIO(_stdin_read[1])
    path = Path(source)
    check_readable(path, "an image file")
    return str(path), path


_stdin_read: tuple | None = None  # (the stream, its bytes) that "-" read, kept for `read_params("-")`


def made_from(source) -> dict | None:
    """The parameters an input image carries (a diffedit output earlier in a pipe chain), or None."""
    if not isinstance(source, (str, Path)):
        return None
    try:
        return read_params(source)
    except DiffeditError:
        return None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost the user the image
        return img


def _to_rgb(img: Image.Image, alpha: str, name: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I"):
        # 16-bit (and 32-bit int) data: scale the 0..65535 range onto 0..255 instead of clipping.
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # alpha channel present but fully opaque
            return rgba.convert("RGB")
        if alpha == "as-mask":
            return rgba.getchannel("A").convert("RGB")
        if alpha == "refuse":
            raise DiffeditError(
                f"{name}: has an alpha channel with transparent pixels; "
                "flatten it first or let it be composited on white"
            )
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise DiffeditError(f"{name}: unsupported pixel mode {mode}") from None


FIT_POLICIES = ("pad", "resize", "crop")


@dataclass(frozen=True)
class Fit:
    """How an image of `size` (w, h) is brought to a `canvas` whose sides are multiples of the model's,
    and back: the model works on the canvas, every output is returned at `size`.

    Policies: "pad" adds edge pixels right and bottom (cropped away again: the image's own pixels are
    never resampled), "resize" scales to the nearest multiples (and back), "crop" cuts the centre
    (the cut border comes back as the result's edge pixels).
    """

    size: tuple[int, int]
    canvas: tuple[int, int]
    policy: str = "pad"

    @classmethod
    def of(cls, size: tuple[int, int], multiple: int, policy: str = "pad") -> Fit:
        if policy not in FIT_POLICIES:
            raise UsageError(f"unknown fit policy {policy!r}; use pad, resize or crop")
        if multiple < 1:
            raise UsageError(f"multiple must be at least 1, not {multiple}")
        w, h = size
        if policy == "pad":
            canvas = (-(-w // multiple) * multiple, -(-h // multiple) * multiple)
        elif policy == "resize":
            canvas = tuple(max(multiple, (s + multiple // 2) // multiple * multiple) for s in (w, h))
        else:
            canvas = (w // multiple * multiple, h // multiple * multiple)
            if 0 in canvas:
                raise DiffeditError(f"image is {w}x{h} pixels; too small to crop to a multiple of {multiple} "
                                    "(use pad or resize)")
        return cls((w, h), canvas, policy)

    @property
    def changed(self) -> bool:
        return self.size != self.canvas

    @property
    def offset(self) -> tuple[int, int]:
        """Where the canvas's top-left corner lies in the image (crop: the centred cut; else 0, 0)."""
        if self.policy != "crop":
            return 0, 0
        return (self.size[0] - self.canvas[0]) // 2, (self.size[1] - self.canvas[1]) // 2

    def apply(self, img: Image.Image, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
        """The image (or a mask of its size: resample NEAREST) brought to the canvas."""
        return self._move(img, self.size, self.canvas, resample, forward=True)

    def undo(self, img: Image.Image, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
        """A canvas-sized result brought back to the image's own size."""
        return self._move(img, self.canvas, self.size, resample, forward=False)

    def _move(self, img: Image.Image, have: tuple[int, int], want: tuple[int, int], resample: int,
              forward: bool) -> Image.Image:
        if img.size != have:
            raise ValueError(f"expected an image of {have[0]}x{have[1]} pixels, not {img.width}x{img.height}")
        if have == want:
            return img
        if self.policy == "resize":
            return img.resize(want, resample)
        left, top = self.offset
        if forward == (self.policy == "crop"):  # cut: crop's way in, pad's way back
            return img.crop((left, top, left + want[0], top + want[1]))
        a = np.asarray(img)  # grow by edge pixels: pad's way in, crop's way back
        pad = [(top, want[1] - have[1] - top), (left, want[0] - have[0] - left)] + [(0, 0)] * (a.ndim - 2)
        return Image.fromarray(np.pad(a, pad, mode="edge"))


def size_dict(size: tuple[int, int]) -> dict:
    """A (w, h) size as results and metadata write it."""
    return {"width": size[0], "height": size[1]}


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [1, 3, H, W] in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor [1, 3, H, W] or [3, H, W] in [-1, 1] -> RGB image (clamped, rounded)."""
    t = tensor.detach().to("cpu", torch.float32)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a [1, 3, H, W] or [3, H, W] tensor, got {list(tensor.shape)}")
    if torch.isnan(t).any():
        raise DiffeditError("the image tensor contains NaN values (numerical overflow?)")
    a = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a)


def save_image(
    img: Image.Image, dest: str | Path, *, params: dict | None = None, overwrite: bool = False
) -> None:
    """Write `img` to `dest` (format from the suffix; "-" writes PNG to stdout) without clobbering.

    PNG outputs carry `params` as JSON in an iTXt chunk named "diffedit" (see `read_params`).
    """
    if str(dest) == "-":
        buf = io.BytesIO()
        img.save(buf, format="PNG", **_png_options(params))
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
        return
    path = Path(dest)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DiffeditError(
            f"{path}: unsupported output format {path.suffix or '(no suffix)'}; use .png, .jpg, .webp or .tif"
        )
    options = _png_options(params) if fmt == "PNG" else {**_SAVE_OPTIONS.get(fmt, {}), **_exif_options(fmt, params)}
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    try:
        with atomic_output(path, overwrite) as tmp:
            img.save(tmp, format=fmt, **options)
    except OSError as e:
        raise DiffeditError(f"{path}: cannot write ({_one_line(e)})") from None


def _png_options(params: dict | None) -> dict:
    if params is None:
        return {}
    info = PngImagePlugin.PngInfo()
    # iTXt is UTF-8, so prompts in any language survive; default=str covers Paths and the like.
    info.add_itxt(PARAMS_KEY, json.dumps(params, ensure_ascii=False, default=str))
    info.add_itxt(A1111_KEY, a1111_text(params))  # what "PNG Info" of A1111 and ComfyUI shows
    return {"pnginfo": info}


A1111_KEY = "parameters"
_IMAGE_DESCRIPTION, _EXIF_IFD, _USER_COMMENT = 0x010E, 0x8769, 0x9286


def _exif_options(fmt: str, params: dict | None) -> dict:
    """JPEG/WebP/TIFF: the parameters as JSON in the image description, and A1111's text in the EXIF
    UserComment (UTF-16, as A1111 writes it) where the format has EXIF."""
    if params is None:
        return {}
    description = json.dumps(params, ensure_ascii=True, default=str)
    if fmt == "TIFF":
        return {"tiffinfo": {_IMAGE_DESCRIPTION: description}}
    exif = Image.Exif()
    exif[_IMAGE_DESCRIPTION] = description
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + a1111_text(params).encode("utf-16-be")
    return {"exif": exif.tobytes()}


def a1111_text(params: dict) -> str:
    """The parameters as A1111 writes them ("prompt\nNegative prompt: ...\nSteps: 50, Sampler: ..."),
    so tools that read that format show them; the full record stays in the `diffedit` JSON."""
    prompt = params.get("prompt") or params.get("target") or ""
    lines = [str(prompt)]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    model = params.get("model") or {}
    size = params.get("size")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": params.get("engine") or "DDIM",
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": f"{size.get('width')}x{size.get('height')}" if isinstance(size, dict) else None,
        "Model hash": str(model.get("fingerprint", ""))[:10] or None,
        "Model": Path(str(model["source"])).name if model.get("source") else None,
        "Source prompt": params.get("source"),
        "Version": f"diffedit {params.get('diffedit', '')}".strip(),
        "Command": params.get("command"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


def read_params(path: str | Path) -> dict | None:
    """The parameters stored in a PNG by `save_image`, or None if it has none."""
    name, fp = _open_source(path)
    try:
        with Image.open(fp) as img:
            text = getattr(img, "text", None) or img.info
            raw = text.get(PARAMS_KEY)
            if raw is None:  # JPEG, WebP, TIFF: the image description
                raw = img.getexif().get(_IMAGE_DESCRIPTION)
                if raw is not None and not str(raw).lstrip().startswith("{"):
                    raw = None  # some other program's description
    except UnidentifiedImageError:
        raise DiffeditError(f"{name}: not an image file (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DiffeditError(f"{name}: cannot read ({_one_line(e)})") from None
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise DiffeditError(f"{name}: the {PARAMS_KEY!r} text chunk is not valid JSON") from None
    if not isinstance(value, dict):
        raise DiffeditError(f"{name}: the {PARAMS_KEY!r} text chunk is not a JSON object")
    return value


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images of the same size (inf if identical)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of the same shape, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


__all__ = [
    "FORMATS", "Fit", "load_image", "psnr", "read_params",
    "save_image", "to_pil", "to_tensor",
]
