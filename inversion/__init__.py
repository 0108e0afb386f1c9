"""The engines, one module each: every way to turn an image into a record and a record into an
image (`diffedit.engines.Engine`). Not every engine inverts in the strict sense (InfEdit and FlowEdit
never compute an inversion; they edit from the source image directly); all of them live here.

`get_engine` is the one place a name becomes an engine.
"""

from __future__ import annotations

import importlib
import pkgutil

from diffedit.engines import ENGINES, Engine
from diffedit.errors import UsageError


def engine_names() -> list[str]:
    """Names of all engines; importing every module of this package registers them."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(ENGINES)


def get_engine(name: str) -> Engine:
    if name not in engine_names():
        raise UsageError(f"unknown engine {name!r}; available: {', '.join(engine_names())}")
    return ENGINES[name]()
