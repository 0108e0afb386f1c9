"""The engine interface: every inversion/editing engine is one class in `inversion/`.

An engine turns a clean latent into the tensors of a record (`invert`) and turns those tensors
back into a clean latent under the target branch (`edit`); reconstruction is an edit whose target
is the source. Engines register themselves by name, so adding one adds only its file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffedit.errors import UsageError
from diffedit.families import Family, Schedule
from diffedit.editing.attention import Controller
from diffedit.sampling import Callback, Denoiser

ENGINES: dict[str, type[Engine]] = {}


@dataclass
class Run:
    """Everything an engine needs for one image: model, schedule, source and target branches."""

    model: Family
    schedule: Schedule
    source: Denoiser  # source prompt with the inversion guidance
    target: Denoiser  # target prompt with the editing guidance (the source, to reconstruct)
    params: dict = field(default_factory=dict)
    seed: int = 0
    callback: Callback | None = None
    prompts: tuple[str, str] = ("", "")  # source and target prompt
    scales: tuple[float, float] = (1.0, 1.0)  # their guidance scales
    # Builds a denoiser over several prompts at once (one row each) with the edit's guidance, an
    # optional attention controller and optional per-row scales: engines that edit a source and a
    # target side by side use it (see `denoiser_for`).
    make_denoiser: Callable[..., Denoiser] | None = None
    show_attention: bool = False  # engines with attention control leave maps in `extras`
    extras: dict = field(default_factory=dict)
    _made: list = field(default_factory=list)

    def denoiser_for(self, prompts: list[str], controller: Controller | None = None,
                     scales: list[float] | None = None) -> Denoiser:
        """Denoiser over `prompts` (one row each); `scales` overrides the guidance scale per row."""
        denoiser = self.make_denoiser(prompts, controller, scales)
        self._made.append(denoiser)
        return denoiser

    @property
    def denoisers(self) -> list[Denoiser]:
        return [self.source] + ([self.target] if self.target is not self.source else []) + self._made

    @property
    def nfe(self) -> int:
        return sum(d.calls for d in self.denoisers)

    @property
    def forwards(self) -> dict[int, int]:
        """Network calls by batch size (for cost accounting in benchmarks)."""
        out: dict[int, int] = {}
        for d in self.denoisers:
            for rows, calls in d.forwards.items():
                out[rows] = out.get(rows, 0) + calls
        return out


class Engine:
    name: str = ""
    exact: bool = False  # invert -> reconstruct returns the latent to float precision
    # its edit samples with `run.target` alone and retraces nothing, so DeepCache and adaptive guidance
    # may speed up the regeneration (exact engines must retrace their inversion: they refuse them)
    accelerable: bool = False
    defaults: dict = {}  # engine parameters and their defaults
    default_steps: int = 50
    default_guidance: tuple[float, float] = (1.0, 7.5)  # CFG of the inversion and of the edit

    def check(self, params: dict, steps: int) -> None:
        """Raise UsageError for parameters the engine cannot run with."""

    def configure(self, model) -> None:
        """Adapt defaults to a model (its family, whether it is a latent-consistency model) or refuse
        it (called before parameters are merged)."""

    def invert(self, run: Run, z0: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def edit(self, run: Run, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def register(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls


def engine_names() -> list[str]:
    """Names of all engines; importing every module of `inversion/` registers them."""
    import diffedit.inversion as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return sorted(ENGINES)


def get_engine(name: str) -> Engine:
    if name not in engine_names():
        raise UsageError(f"unknown engine {name!r}; available: {', '.join(engine_names())}")
    return ENGINES[name]()
