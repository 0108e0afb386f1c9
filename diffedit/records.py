"""Inversion records: one `.safetensors` file, tensors plus JSON metadata in its header.

The metadata names the model (source and fingerprint), its family and scheduler config, the
engine and its parameters, prompts, guidance, steps, seed, image size and the diffedit version,
so `reconstruct` and `edit` can rebuild the exact job from the file alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from diffedit import __version__
from diffedit.errors import DiffeditError
from diffedit.files import atomic_output

FORMAT = 1  # bump when a record written by this version cannot be read by older ones
META_KEY = "diffedit"


@dataclass
class Record:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

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
    meta = {
        "source": model.source,
        "fingerprint": model.fingerprint,
        "family": model.name,
        "prediction": model.prediction,
        "scheduler": dict(model.pipe.scheduler.config),
    }
    if adapters_meta(model):
        meta["adapters"] = adapters_meta(model)
    if model.loras:
        meta["loras"] = model.loras
    return meta


def save_record(path: str | Path, record: Record, overwrite: bool = False) -> None:
    meta = {"format": FORMAT, "version": __version__, **record.meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in record.tensors.items()}  # dtypes kept
    data = save(tensors, metadata={META_KEY: json.dumps(meta, default=str)})
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
    if meta.get("format", 0) > FORMAT:
        raise DiffeditError(
            f"{path}: record format {meta.get('format')} is newer than this diffedit "
            f"({__version__}, format {FORMAT}) reads; upgrade diffedit"
        )
    return Record(tensors, meta)
