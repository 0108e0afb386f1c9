"""Loading a model from a hub id, a diffusers folder or a single safetensors file.

The family is read from the configs (or, for single files, from the weight names), never from the
model's name. Pickled weights are refused unless the caller allows them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from diffedit.errors import DiffeditError, UsageError
from diffedit.families import Family, adapter_for

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "samples" / "toy-sd"
TOY_FLOW = DEFAULT_MODEL.parent / "toy-flow"  # the shipped toy flow model (SD3-style)
TOY_LCM = DEFAULT_MODEL.parent / "toy-lcm"  # the toy model distilled to a latent-consistency model
TOY_LCM_LORA = DEFAULT_MODEL.parent / "toy-lcm-lora" / "pytorch_lora_weights.safetensors"  # its LCM-LoRA
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():  # one GPU per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffeditError("--device cuda: no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, family: str) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "flux" else torch.float16
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


# -- family detection ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DiffeditError(f"{path}: unreadable config ({err})") from None


def family_of_folder(folder: Path) -> str:
    """sd1 / sd2 / sdxl / sd3 / flux from a diffusers folder's configs."""
    index = _read_json(folder / "model_index.json")
    if "transformer" in index:
        cls = _read_json(folder / "transformer" / "config.json").get("_class_name", "")
        if cls.startswith("SD3Transformer"):
            return "sd3"
        if cls.startswith("FluxTransformer"):
            return "flux"
        raise DiffeditError(f"{folder}: unsupported transformer {cls!r} (supported: SD3, Flux)")
    if "unet" not in index:
        raise DiffeditError(f"{folder}: neither a UNet nor a transformer pipeline")
    unet = _read_json(folder / "unet" / "config.json")
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    text = folder / "text_encoder" / "config.json"
    open_clip = text.exists() and _read_json(text).get("hidden_act") == "gelu"  # SD2's OpenCLIP
    return "sd2" if open_clip or scheduler.get("prediction_type") == "v_prediction" else "sd1"


def family_of_single_file(path: Path) -> str:
    """Family of an original-format (CompVis / Stability / BFL) checkpoint from its weight names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DiffeditError(f"{path}: not a readable safetensors file ({err})") from None
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "flux"
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("model.diffusion_model.input_blocks."):
        return "sd1"
    raise DiffeditError(f"{path}: not a Stable Diffusion / SD3 / Flux checkpoint (unknown weight names)")


# -- fingerprints ----------------------------------------------------------------------------------


def fingerprint(paths: list[Path]) -> str:
    """sha256 over config files and the size, head and tail of every weight file.

    Reading whole multi-GB weights would make every command slow; size + 2 MiB samples tell
    checkpoints apart in practice, and configs are hashed whole.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as f:
            if path.suffix == ".json" or size <= 2 << 20:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _model_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


# -- loading -----------------------------------------------------------------------------------------


def _pipeline_class(family: str):
    import diffusers

    return {
        "sd1": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
        "sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
        "flux": diffusers.FluxPipeline,
    }[family]


def _download(repo_id: str) -> Path:
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id, use_safetensors=True))
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else _first_line(err)
        raise DiffeditError(f"{repo_id}: cannot load from the hub ({why})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _check_no_pickles(folder: Path, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    for component in folder.iterdir():
        if not component.is_dir():
            continue
        files = list(component.iterdir())
        pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            raise DiffeditError(
                f"{pickled[0]}: pickled weights can run arbitrary code; pass --allow-pickle if you trust them"
            )


def _quiet_libraries() -> None:
    """Our progress bars and errors own stderr; silence the libraries' loading chatter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(
    spec: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
    allow_pickle: bool = False, config: str | None = None, max_sequence_length: int | None = None,
    loras: list[tuple[str, float]] | None = None, lcm_lora: str | None = None, offload: str | None = None,
) -> Family:
    """Load `spec` (hub id, diffusers folder or single file) and wrap it in its family adapter.

    `loras` ((file, scale) pairs) are fused into the weights; `lcm_lora` too, and it makes the model a
    latent-consistency model (LCMScheduler on the base model's schedule), as LCM-LoRA is used.
    The adapter carries `source` (what was asked for), `fingerprint` (see `fingerprint`; LoRAs
    included) and `loras` (what was fused, for records).

    `offload` keeps the weights in CPU memory and moves them to the device only while they run
    (accelerate's hooks, through diffusers): "model" one whole model (text encoder, network, VAE) at a
    time, "sequential" one layer at a time (least device memory, slowest). For a GPU too small for
    the model; the results are the same.
    """
    _quiet_libraries()
    spec = str(spec or DEFAULT_MODEL)
    path = Path(spec).expanduser()
    dev = pick_device(device)
    if path.is_file():
        if path.suffix != ".safetensors":  # pickled single files (.ckpt, .bin, .pt) are not read at all
            raise DiffeditError(f"{path}: single-file checkpoints must be .safetensors (pickled checkpoints can run "
                                "code; convert it to safetensors where you trust it)")
        family = family_of_single_file(path)
        files = [path]
        pipe = _load_single_file(path, family, pick_dtype(dtype, dev, family), config)
    elif path.is_dir():
        if not (path / "model_index.json").exists():
            raise DiffeditError(f"{path}: not a diffusers model folder (no model_index.json)")
        family, files, folder = family_of_folder(path), _model_files(path), path
        pipe = _load_folder(path, family, pick_dtype(dtype, dev, family), allow_pickle)
    elif HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        folder = _download(spec)
        family, files = family_of_folder(folder), _model_files(folder)
        pipe = _load_folder(folder, family, pick_dtype(dtype, dev, family), allow_pickle)
    else:
        raise DiffeditError(f"{spec}: no such model file or folder (nor a hub id like org/name)")
    fused = _fuse_loras(pipe, family, spec, loras or [], lcm_lora)
    if offload is None:
        pipe.to(dev)
    elif offload in OFFLOAD:
        getattr(pipe, OFFLOAD[offload])(device=dev)
    else:
        raise UsageError(f"--offload {offload!r}: choose {' or '.join(OFFLOAD)}")
    pipe.set_progress_bar_config(disable=True)
    model = adapter_for(pipe, family, max_sequence_length)
    if offload is not None:
        model.execution_device = dev
    model.source, model.loras = spec, fused
    model.fingerprint = fingerprint(files) if not fused else _with_loras(fingerprint(files), fused)
    if not path.is_file():  # a folder (local or downloaded) may recommend settings
        settings = recommended_settings(folder)
        model.recommended = settings if not fused else {}
        # the VAE's setting holds with LoRAs too: they change the network only
        model.decoder_inversion = model.folder_decoder_inversion = settings.get("vae", {}).get("decoder_inversion", 0)
    return model


OFFLOAD = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}
SETTINGS_FILE = "diffedit.json"


def recommended_settings(folder: Path) -> dict:
    """The settings a model folder recommends (`diffedit.json`), checked for shape: {"engines": {name:
    {option: value}}, "move": {option: value}, "vae": {"decoder_inversion": steps}}; {} when the folder
    has none."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    settings = _read_json(path)
    engines = settings.get("engines", {}) if isinstance(settings, dict) else None
    move = settings.get("move", {}) if isinstance(settings, dict) else None
    vae = settings.get("vae", {}) if isinstance(settings, dict) else None
    if (not isinstance(engines, dict) or not isinstance(move, dict) or not isinstance(vae, dict)
            or not all(isinstance(v, dict) for v in engines.values())):
        raise DiffeditError(f"{path}: expected {{\"engines\": {{NAME: {{OPTION: VALUE}}}}, \"move\": {{OPTION: VALUE}}, "
                            "\"vae\": {\"decoder_inversion\": STEPS}}")
    steps = vae.get("decoder_inversion", 0)
    if set(vae) - {"decoder_inversion"} or isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise DiffeditError(f"{path}: \"vae\" takes only \"decoder_inversion\", a whole number of steps >= 0")
    return {"engines": engines, "move": move, **({"vae": vae} if vae else {}), "file": str(path)}


def _fuse_loras(pipe, family: str, spec: str, loras: list[tuple[str, float]], lcm_lora: str | None) -> list[dict]:
    from diffusers import LCMScheduler

    from diffedit import lora

    fused = []
    for path, scale in loras:
        lora.fuse(pipe, path, scale)
        fused.append({"path": str(path), "scale": scale})
    if lcm_lora is not None:
        if family in ("sd3", "flux"):
            raise UsageError(f"{spec}: --lcm-lora applies to Stable Diffusion UNets (SD1/SD2/SDXL), not {family}")
        if isinstance(pipe.scheduler, LCMScheduler):
            raise UsageError(f"{spec}: already a latent-consistency model; --lcm-lora is for base models")
        lora.fuse(pipe, lcm_lora, 1.0)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        fused.append({"path": str(lcm_lora), "scale": 1.0, "lcm": True})
    return fused


def _with_loras(base: str, fused: list[dict]) -> str:
    digest = hashlib.sha256(base.encode())
    for entry in fused:
        digest.update(fingerprint([Path(entry["path"])]).encode())
        digest.update(repr((entry["scale"], entry.get("lcm", False))).encode())
    return digest.hexdigest()[:16]


def _load_folder(folder: Path, family: str, dtype: torch.dtype, allow_pickle: bool):
    _check_no_pickles(folder, allow_pickle)
    cls = _pipeline_class(family)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family in ("sd1", "sd2") else {}
    # Components saved as absent ([null, null], e.g. an SD3 without its T5) must be passed as None.
    index = _read_json(folder / "model_index.json")
    kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]})
    wanted = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v != [None, None]
              and k not in kwargs]
    missing = [k for k in wanted if not (folder / k).is_dir()]
    if missing:  # diffusers would build some of them from defaults (a tokenizer without vocabulary)
        raise DiffeditError(f"{folder}: model_index.json lists {', '.join(missing)}, but the folder has no "
                            f"{missing[0]}/ subfolder")
    try:
        return cls.from_pretrained(folder, dtype=dtype, use_safetensors=not allow_pickle, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise DiffeditError(f"{folder}: cannot load the pipeline ({_first_line(err)})") from None


def _load_single_file(path: Path, family: str, dtype: torch.dtype, config: str | None):
    cls = _pipeline_class(family)
    kwargs = {"config": config} if config else {}
    if family in ("sd1", "sd2"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_single_file(str(path), dtype=dtype, **kwargs)
    except Exception as err:
        hint = "" if config else "; pass --model-config with a diffusers folder or hub id holding its configs"
        raise DiffeditError(f"{path}: cannot load the checkpoint ({_first_line(err)}){hint}") from None


def describe(model: Family) -> dict:
    """What `diffedit models info` prints."""
    net = model.network
    return {
        "source": model.source,
        "family": model.name,
        "prediction": model.prediction,
        "fingerprint": model.fingerprint,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "default_size": list(model.default_size()),
        "size_multiple": model.multiple,
        "latent_channels": model.latent_channels,
        "network": type(net).__name__,
        "network_parameters": sum(p.numel() for p in net.parameters()),
        "scheduler": type(model.pipe.scheduler).__name__,
        **({"loras": model.loras} if model.loras else {}),
        **({"recommended": {k: v for k, v in model.recommended.items() if k != "file"}} if model.recommended else {}),
    }
