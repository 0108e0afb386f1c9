"""`diffedit models ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, LcmLoraOpt, LoraOpt, PickleOpt, emit, load
from diffedit.cli.main import app

models_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("info")
def info(
    model: Annotated[str | None, typer.Argument(help="Hub id, diffusers folder or .safetensors file (default: the toy model).")] = None,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "auto", allow_pickle: PickleOpt = False,
    model_config: ConfigOpt = None, lora: LoraOpt = None, lcm_lora: LcmLoraOpt = None, json: JsonOpt = False,
):
    """Family, prediction type, sizes, dtype and origin of a model (with the LoRAs given fused).

    Example: diffedit models info samples/toy-sd
    """
    from diffedit.models import describe

    emit(describe(load(model, device, dtype, allow_pickle, model_config, loras=lora, lcm_lora=lcm_lora)), json)


@models_app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="Hub id or diffusers folder of an SD 1.x model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The single .safetensors checkpoint to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    allow_pickle: PickleOpt = False, json: JsonOpt = False,
):
    """Write a model as one original-layout .safetensors checkpoint (what A1111/ComfyUI load).

    Example: diffedit models export samples/toy-sd -o toy-sd.safetensors
    """
    from safetensors.torch import save

    from diffedit.convert import to_single_file
    from diffedit.errors import UsageError
    from diffedit.files import atomic_output, check_writable

    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: the checkpoint must be a .safetensors file")
    check_writable(output, overwrite)
    m = load(model, "cpu", "auto", allow_pickle, None)
    data = save(to_single_file(m.pipe, m.name), metadata={"format": "pt", "diffedit_source": m.source})
    with atomic_output(output, overwrite) as tmp:
        tmp.write_bytes(data)
    emit({"output": str(output), "family": m.name, "bytes": len(data)}, json)
