"""`diffedit models ...`."""

from __future__ import annotations

from typing import Annotated

import typer

from diffedit.cli.common import ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, PickleOpt, emit, load
from diffedit.cli.main import app

models_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("info")
def info(
    model: Annotated[str | None, typer.Argument(help="Hub id, diffusers folder or .safetensors file (default: the toy model).")] = None,
    device: DeviceOpt = "cpu", dtype: DtypeOpt = "auto", allow_pickle: PickleOpt = False,
    model_config: ConfigOpt = None, json: JsonOpt = False,
):
    """Family, prediction type, sizes, dtype and origin of a model.

    Example: diffedit models info samples/toy-sd
    """
    from diffedit.models import describe

    emit(describe(load(model, device, dtype, allow_pickle, model_config)), json)
