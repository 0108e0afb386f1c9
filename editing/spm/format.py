"""SPM adapter files: which layers a membrane covers, one membrane's weights, `.spm.safetensors`
reading and writing (format `diffedit-spm`, version 1). The method is described in
`diffedit.editing.spm`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffedit import __version__
from diffedit.errors import DiffeditError, UsageError

FORMAT = "diffedit-spm"
VERSION = 1


# -- which layers ----------------------------------------------------------------------------------
def target_layers(network: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv2d inside the network's transformer blocks, by qualified name."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if hasattr(network, "down_blocks"):  # UNets: the Transformer2DModel blocks of SD1/SD2/SDXL
        blocks = [name for name, mod in network.named_modules() if isinstance(mod, Transformer2DModel)]
    else:  # SD3 / Flux: every (single) transformer block
        blocks = [name for name, _ in network.named_modules()
                  if re.fullmatch(r"(single_)?transformer_blocks\.\d+", name)]
    out = {}
    for block in blocks:
        for name, mod in network.get_submodule(block).named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                out[f"{block}.{name}"] = mod
    if not out:
        raise DiffeditError("the network has no transformer blocks to put SPM membranes on")
    return out


def _shapes(layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) weight shapes of a rank-1 branch on `layer`."""
    if isinstance(layer, nn.Linear):
        return (1, layer.in_features), (layer.out_features, 1)
    if layer.groups != 1:
        raise DiffeditError("grouped convolutions are not supported by SPM membranes")
    return (1, layer.in_channels, *layer.kernel_size), (layer.out_channels, 1, 1, 1)


# -- one membrane (one concept) --------------------------------------------------------------------
@dataclass
class Membrane:
    """A rank-1 adapter for one concept: `weights[layer] = (down, up)` plus its metadata."""

    concept: str
    surrogate: str
    family: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    prompts: list[str] = field(default_factory=list)  # the erased prompts (FT compares against these)
    alpha: float = 1.0
    rank: int = 1
    training: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # the model it was trained on (source, fingerprint)
    name: str = ""  # file it came from

    @classmethod
    def new(cls, model, concept: str, surrogate: str = "", seed: int = 0, prompts: list[str] | None = None):
        """A fresh membrane: `down` drawn like LoRA's (Kaiming uniform), `up` zero (the identity)."""
        check_concept(concept)
        gen = torch.Generator("cpu").manual_seed(seed)
        weights = {}
        for name, layer in target_layers(model.network).items():
            down_shape, up_shape = _shapes(layer)
            fan_in = math.prod(down_shape[1:])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a = sqrt(5), as nn.Linear's default
            down = (torch.rand(down_shape, generator=gen) * 2 - 1) * bound
            weights[name] = (down, torch.zeros(up_shape))
        return cls(concept, surrogate, model.name, weights, prompts=list(prompts or [concept]),
                   base={"source": model.source, "fingerprint": model.fingerprint})

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.parameters())

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.weights):
            for t in self.weights[name]:
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"concept": self.concept, "surrogate": self.surrogate, "family": self.family,
                "prompts": self.prompts, "rank": self.rank, "alpha": self.alpha, "layers": len(self.weights),
                "params": self.params, "digest": self.digest, "base": self.base, "training": self.training}

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save

        from diffedit.files import atomic_output

        tensors = {}
        for name, (down, up) in self.weights.items():
            tensors[f"{name}.down"] = down.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.up"] = up.detach().to("cpu", dtype).contiguous()
        meta = {"format": FORMAT, "version": str(VERSION), "diffedit": __version__, "concept": self.concept,
                "surrogate": self.surrogate, "family": self.family, "prompts": json.dumps(self.prompts),
                "rank": str(self.rank), "alpha": str(self.alpha), "training": json.dumps(self.training),
                "base": json.dumps(self.base)}
        data = save(tensors, metadata=meta)
        with atomic_output(path, overwrite) as tmp:
            tmp.write_bytes(data)

    @classmethod
    def load(cls, path: str | Path) -> Membrane:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DiffeditError(f"{path}: no such adapter file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors has its own error types for corrupt headers and data
            raise DiffeditError(f"{path}: not a readable SPM adapter ({str(err).splitlines()[0]})") from None
        if meta.get("format") != FORMAT:
            raise DiffeditError(f"{path}: a safetensors file without SPM adapter metadata, not an adapter")
        if int(meta.get("version", "0")) > VERSION:
            raise DiffeditError(f"{path}: adapter format {meta['version']} is newer than this diffedit reads")
        try:
            prompts = json.loads(meta["prompts"])
            training, base = json.loads(meta.get("training", "{}")), json.loads(meta.get("base", "{}"))
            rank, alpha = int(meta["rank"]), float(meta["alpha"])
            concept, family = meta["concept"], meta["family"]
        except (KeyError, ValueError) as err:
            raise DiffeditError(f"{path}: adapter metadata is incomplete or invalid ({err})") from None
        if rank != 1:
            raise DiffeditError(f"{path}: rank {rank} adapter; SPM membranes are rank 1")
        weights = {}
        for key in tensors:
            if not key.endswith((".down", ".up")):
                raise DiffeditError(f"{path}: unexpected tensor {key!r} in the adapter")
        for key in sorted(k for k in tensors if k.endswith(".down")):
            name = key[: -len(".down")]
            if f"{name}.up" not in tensors:
                raise DiffeditError(f"{path}: layer {name} has no 'up' weight")
            down, up = tensors[key].float(), tensors[f"{name}.up"].float()
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise DiffeditError(f"{path}: layer {name} holds NaN/Inf weights")
            weights[name] = (down, up)
        if len(weights) * 2 != len(tensors) or not weights:
            raise DiffeditError(f"{path}: adapter weights are incomplete")
        return cls(concept, meta.get("surrogate", ""), family, weights, prompts=prompts, alpha=alpha, rank=rank,
                   training=training, base=base, name=str(path))

    def check_fits(self, model) -> None:
        """Refuse a membrane made for another family or another architecture."""
        label = self.name or f"adapter {self.concept!r}"
        if self.family != model.name:
            raise DiffeditError(f"{label}: adapter for model family {self.family}, but the model is {model.name}")
        layers = target_layers(model.network)
        missing = sorted(set(layers) - set(self.weights))
        extra = sorted(set(self.weights) - set(layers))
        if missing or extra:
            what = f"no weights for layer {missing[0]}" if missing else f"layer {extra[0]} is not in the model"
            raise DiffeditError(f"{label}: does not fit this {model.name} model ({what})")
        for name, layer in layers.items():
            shapes = _shapes(layer)
            got = tuple(tuple(t.shape) for t in self.weights[name])
            if got != shapes:
                raise DiffeditError(f"{label}: layer {name} has shapes {got}, the model needs {shapes}")


def check_concept(concept: str) -> None:
    if not concept or not concept.strip():
        raise UsageError("--concept must name the concept to erase (got an empty string)")


def load_membranes(paths: list[str | Path]) -> list[Membrane]:
    return [Membrane.load(p) for p in paths]
