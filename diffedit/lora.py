"""LoRA files: read the common formats, fuse them into a pipeline's weights, train new ones.

Fused, not hooked: W <- W + scale * (alpha / rank) * up @ down, once at load time, so sampling costs
nothing extra and attention controllers see ordinary layers. Two key layouts are read:
- diffusers / PEFT: `unet.<module>.lora_A.weight` and `.lora_B.weight` (or `.lora.down/.lora.up`),
  optional `unet.<module>.alpha`; prefixes `unet`, `transformer`, `text_encoder`, `text_encoder_2`;
- kohya: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`; prefixes
  `lora_unet`, `lora_te` / `lora_te1`, `lora_te2`. The UNet's modules may be named as diffusers names
  them (`down_blocks_1_attentions_0_...`) or as the original Stable Diffusion (LDM) code does
  (`input_blocks_4_1_...`, the names of `diffedit.convert`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffedit.convert import ldm_unet_name
from diffedit.errors import DiffeditError, UsageError

KOHYA_PREFIXES = {"lora_unet": "network", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet": "network", "transformer": "network", "text_encoder": "text_encoder",
                      "text_encoder_2": "text_encoder_2"}
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
         (".lora_down.weight", ".lora_up.weight"))
# The layers a trained LoRA adapts: every linear and convolution of the network's blocks.
TRAINED_LAYERS = (nn.Linear, nn.Conv2d)


def parse_spec(spec: str) -> tuple[str, float]:
    """`path` or `path:scale` (the scale after the last colon, when it is a number)."""
    head, sep, tail = spec.rpartition(":")
    try:
        scale = float(tail) if sep and head else None
    except ValueError:
        scale = None
    if scale is None:
        return spec, 1.0
    if not math.isfinite(scale):
        raise UsageError(f"{spec}: the LoRA scale after ':' must be a finite number")
    return head, scale


def read(path: str | Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{component: {module name: {"down", "up", "alpha"?}}} from a .safetensors LoRA file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DiffeditError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise DiffeditError(f"{path}: LoRA files must be .safetensors (pickled weights can run arbitrary code)")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise DiffeditError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        component, module, part = _split(key)
        if component is None:
            raise DiffeditError(f"{path}: unrecognised LoRA key {key!r} (expected diffusers/PEFT or kohya names)")
        layers.setdefault(component, {}).setdefault(module, {})[part] = tensor
    for component, modules in layers.items():
        for module, parts in modules.items():
            if "down" not in parts or "up" not in parts:
                raise DiffeditError(f"{path}: LoRA layer {module!r} lacks its {'up' if 'down' in parts else 'down'} "
                                    "matrix")
    if not layers:
        raise DiffeditError(f"{path}: holds no LoRA layers")
    return layers


def _split(key: str) -> tuple[str | None, str, str]:
    """(component, module name (kohya: with _ for .), part) of a key; component None if unknown."""
    for down, up in PAIRS:
        for suffix, part in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                return (*_component(stem), part)
    if key.endswith(".alpha"):
        return (*_component(key[: -len(".alpha")]), "alpha")
    return None, key, ""


def _component(stem: str) -> tuple[str | None, str]:
    if stem.startswith("lora_"):
        prefix, _, rest = stem.partition("_")[2].partition("_")
        return KOHYA_PREFIXES.get(f"lora_{prefix}"), rest
    prefix, _, rest = stem.partition(".")
    return DIFFUSERS_PREFIXES.get(prefix), rest


def _aliases(root: nn.Module, name: str) -> list[str]:
    """Other names LoRA files use for the layer `name`: CLIP text encoders' `text_model.<name>` (a
    level transformers 5 removed), a UNet's original-layout (LDM) name."""
    if type(root).__name__.startswith("CLIPText") and not hasattr(root, "text_model"):
        return [f"text_model.{name}"]
    if isinstance(root, UNet2DConditionModel):
        try:
            return [ldm_unet_name(root, name)]
        except DiffeditError:  # layers the original layout names otherwise (SDXL's add_embedding)
            return []
    return []


def _modules_by_name(root: nn.Module) -> dict[str, nn.Module]:
    """Every linear/conv layer by its dotted name, its aliases, and each of those as kohya writes it
    (dots as underscores)."""
    named = {}
    for name, module in root.named_modules():
        if isinstance(module, TRAINED_LAYERS):
            for alias in (name, *_aliases(root, name)):
                named[alias] = module
                named.setdefault(alias.replace(".", "_"), module)
    return named


def fuse(pipe, path: str | Path, scale: float = 1.0) -> int:
    """Add the LoRA in `path` to the pipeline's weights; returns how many layers it changed."""
    layers = read(path)
    changed = 0
    for component, modules in layers.items():
        if component == "network":
            root = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        else:
            root = getattr(pipe, component, None)
        if root is None:
            raise DiffeditError(f"{path}: adapts the {component}, which this model does not have")
        targets = _modules_by_name(root)
        missing = [m for m in modules if m not in targets]
        if missing:
            raise DiffeditError(f"{path}: {len(missing)} of its {len(modules)} {component} layers are not in this "
                                f"model (e.g. {missing[0]!r}); is it a LoRA for another base model?")
        for name, parts in modules.items():
            _fuse_layer(targets[name], parts, scale, path, name)
            changed += 1
    return changed


def _fuse_layer(layer: nn.Module, parts: dict, scale: float, path, name: str) -> None:
    down, up = parts["down"].float(), parts["up"].float()
    rank = down.shape[0]
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise DiffeditError(f"{path}: layer {name!r} has a {tuple(up.shape[2:])} up kernel (LoCon/LyCORIS), "
                            "which is not supported")
    alpha = float(parts["alpha"]) if "alpha" in parts else rank
    delta = up.flatten(1) @ down.flatten(1)
    weight = layer.weight
    if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
        raise DiffeditError(f"{path}: layer {name!r} is {tuple(delta.shape)} in the LoRA but "
                            f"{tuple(weight.shape)} in the model; is it a LoRA for another base model?")
    with torch.no_grad():
        fused = weight.float() + (scale * alpha / rank) * delta.to(weight.device).reshape(weight.shape)
        weight.copy_(fused.to(weight.dtype))


# -- training --------------------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """`base(x) + up(down(x))`, `up` starting at zero (so the layer starts as `base`); base frozen."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def attach(net: nn.Module, rank: int, pattern: str) -> list[str]:
    """Wrap every linear/conv layer whose name matches `pattern` (a regex) in a LoraLayer."""
    names = [n for n, m in net.named_modules() if isinstance(m, TRAINED_LAYERS) and re.search(pattern, n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, LoraLayer(getattr(parent, child), rank))
    return names


def state_dict(net: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The attached LoRA layers in the diffusers/PEFT layout (alpha = rank: no alpha keys)."""
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer):
            out[f"{prefix}.{name}.lora_A.weight"] = module.down.weight.detach().clone()
            out[f"{prefix}.{name}.lora_B.weight"] = module.up.weight.detach().clone()
    return out

