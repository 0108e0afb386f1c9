"""Inversion records: one `.safetensors` file, tensors plus JSON metadata in its header.

The metadata names the model (source and fingerprint), its family and scheduler config, the
engine and its parameters, prompts, guidance, steps, seed, image size and the diffedit version,
so `reconstruct` and `edit` can rebuild the exact job from the file alone.

Local files the record names (the model folder or file, its LoRAs, the input image) are stored
relative to the record's folder, so a record moved together with them still finds them; hub ids are
kept as they are, and the model's fingerprint tells a different model from the one that made it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from diffedit import __version__
from diffedit.errors import DiffeditError
from diffedit.files import atomic_output

# Bump when a record written by this version cannot be read by older ones (2: checksummed; 3: `size`
# and `canvas` as {"width", "height"}, local paths relative to the record).
FORMAT = 3
META_KEY = "diffedit"


@dataclass
class Record:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    name: str = "record"  # its file, for messages

    def check_model(self, model, path: str | Path) -> None:
        """Refuse to use the record with a model other than the one that made it."""
        made_with = self.meta.get("model", {})
        if made_with.get("fingerprint") != model.fingerprint:
            raise DiffeditError(
                f"{path}: record was made with model {made_with.get('source')!r} "
                f"(fingerprint {made_with.get('fingerprint')}), not {model.source!r} "
                f"(fingerprint {model.fingerprint}); use the same --model (and --lora/--lcm-lora)"
            )
        made = [a["digest"] for a in made_with.get("adapters", [])]
        now = [a["digest"] for a in adapters_meta(model)]
        if made != now:
            names = ", ".join(a.get("file") or a["concept"] for a in made_with.get("adapters", [])) or "no adapter"
            raise DiffeditError(f"{path}: record was made with SPM adapters ({names}); pass the same --adapter "
                                "files in the same order")


def adapters_meta(model) -> list[dict]:
    """The SPM adapters attached to the model (concept, file, digest), [] when none."""
    membranes = getattr(model, "membranes", None)
    return membranes.describe() if membranes is not None else []


def model_meta(model) -> dict:
    local = Path(str(model.source)).expanduser().exists()  # else a hub id (or a model built in memory)
    meta = {
        "source": str(Path(model.source).expanduser().resolve()) if local else model.source,
        "local": local,
        "fingerprint": model.fingerprint,
        "family": model.name,
        "prediction": model.prediction,
        "scheduler": dict(model.pipe.scheduler.config),
    }
    if adapters_meta(model):
        meta["adapters"] = adapters_meta(model)
    if model.decoder_inversion:  # the latent was refined after encoding (`Family.invert_decoder`)
        meta["decoder_inversion"] = model.decoder_inversion
    if model.loras:
        meta["loras"] = [{**entry, "path": str(Path(entry["path"]).expanduser().resolve())} for entry in model.loras]
    return meta


def _paths(meta: dict, change) -> dict:
    """The header with `change` applied to each local path it names (model, LoRAs, input image)."""
    meta = json.loads(json.dumps(meta, default=str))
    model = meta.get("model")
    if isinstance(model, dict):
        if model.get("local") is True and isinstance(model.get("source"), str):
            model["source"] = change(model["source"])
        for entry in model.get("loras") or []:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry["path"] = change(entry["path"])
    if isinstance(meta.get("image"), str) and meta["image"] not in ("-", "<memory>"):
        meta["image"] = change(meta["image"])
    return meta


def checksum(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the header (without its checksum) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                                       default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_record(path: str | Path, record: Record, overwrite: bool = False) -> None:
    """Write the record; the local paths it names are stored relative to its folder."""
    folder = Path(path).resolve().parent
    meta = {**record.meta, "format": FORMAT, "version": __version__}
    tensors = {k: v.detach().cpu().contiguous() for k, v in record.tensors.items()}  # dtypes kept
    meta = _paths(meta, lambda p: os.path.relpath(Path(p).expanduser().resolve(), folder))  # as it will be read
    meta["checksum"] = checksum(meta, tensors)
    data = save(tensors, metadata={META_KEY: json.dumps(meta)})
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(data)  # into the file atomic_output made, so it keeps normal permissions


def load_record(path: str | Path) -> Record:
    path = Path(path)
    if not path.is_file():
        raise DiffeditError(f"{path}: no such record file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DiffeditError(f"{path}: not a diffedit record ({str(err).splitlines()[0]})") from None
    if header is None:
        raise DiffeditError(f"{path}: a safetensors file without diffedit metadata, not a record")
    try:
        meta = json.loads(header)
    except ValueError:
        raise DiffeditError(f"{path}: record metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise DiffeditError(f"{path}: record metadata is not a JSON object")
    fmt = meta.get("format", 0)
    if isinstance(fmt, int) and fmt > FORMAT:
        raise DiffeditError(
            f"{path}: record format {meta.get('format')} is newer than this diffedit "
            f"({__version__}, format {FORMAT}) reads; upgrade diffedit"
        )
    if "checksum" not in meta:  # format 1 had none: nothing would tell a changed header from a true one
        raise DiffeditError(f"{path}: record has no checksum (written by diffedit before format 2, or stripped); "
                            "invert the image again")
    if meta["checksum"] != checksum(meta, tensors):
        raise DiffeditError(f"{path}: record was changed after it was written (its checksum does not match its "
                            "header and tensors)")
    if isinstance(fmt, int) and fmt < 3 and isinstance(meta.get("size"), list) and len(meta["size"]) == 2:
        meta["size"] = {"height": meta["size"][0], "width": meta["size"][1]}  # format 2: [height, width]
        meta["canvas"] = meta["size"]  # its images were made at the model's canvas
    check_fields(meta, tensors, str(path))
    folder = path.resolve().parent
    meta = _paths(meta, lambda p: os.path.normpath(folder / p))  # absolute paths stay as they are
    return Record(tensors, meta, str(path))


def check_fields(meta: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """The header's fields that every record has, and the clean latent; one line naming the field."""

    def bad(name: str, wanted: str, value) -> DiffeditError:
        return DiffeditError(f"{path}: record field {name!r} must be {wanted} (found {json.dumps(value, default=str)[:60]})")

    model = meta.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("source", "fingerprint")):
        raise bad("model", "an object with its source and fingerprint", model)
    engine = meta.get("engine")
    if not isinstance(engine, dict) or not isinstance(engine.get("name"), str):
        raise bad("engine", "an object with the engine's name", engine)
    for key in ("source_prompt", "negative_prompt"):
        if not isinstance(meta.get(key, ""), str):
            raise bad(key, "a string", meta.get(key))
    steps = meta.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise bad("steps", "an integer from 1 to 1000", steps)
    seed = meta.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise bad("seed", "an integer in [0, 2^64)", seed)
    scale = meta.get("guidance_scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise bad("guidance_scale", "a finite number", scale)
    for key in ("size", "canvas"):
        value = meta.get(key)
        if (not isinstance(value, dict) or set(value) != {"width", "height"}
                or not all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= 16384 for s in value.values())):
            raise bad(key, '{"width": W, "height": H} in pixels', value)
    how = meta.get("input", {})
    fit = how.get("fit", "resize") if isinstance(how, dict) else None
    if fit not in ("pad", "resize", "crop"):
        raise bad("input", 'an object with "fit" pad, resize or crop', how)
    sides = [(meta["canvas"][k], meta["size"][k]) for k in ("width", "height")]
    if (fit == "pad" and any(c < s for c, s in sides)) or (fit == "crop" and any(c > s for c, s in sides)):
        raise bad("canvas", f"the size as --fit {fit} brings it to the model's multiple", meta["canvas"])
    size = [meta["canvas"]["height"], meta["canvas"]["width"]]  # the canvas the tensors cover
    latent = tensors.get("latent")
    if latent is None:
        raise DiffeditError(f"{path}: record has no tensor 'latent' (the clean latent of the input)")
    if latent.dim() != 4 or latent.shape[0] != 1 or not latent.is_floating_point():
        raise DiffeditError(f"{path}: record tensor 'latent' must be one float latent [1, C, h, w], "
                            f"not {latent.dtype} {list(latent.shape)}")
    for name, shape in (("mask", size), ("pixels", [*size, 3])):
        if name in tensors and (list(tensors[name].shape) != shape or tensors[name].dtype != torch.uint8):
            raise DiffeditError(f"{path}: record tensor {name!r} must be uint8 {shape}, "
                                f"not {tensors[name].dtype} {list(tensors[name].shape)}")
