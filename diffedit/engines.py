"""The engine interface: every inversion/editing engine is one class in `inversion/`.

An engine turns a clean latent into the tensors of a record (`invert`) and turns those tensors
back into a clean latent under the target branch (`edit`); reconstruction is an edit whose target
is the source. Engines register themselves by name, so adding one adds only its file to
`diffedit.inversion`, whose `get_engine` resolves a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch

from diffedit.denoiser import Denoiser
from diffedit.editing.attention import Controller
from diffedit.errors import DiffeditError, UsageError
from diffedit.families import Family
from diffedit.sampling import Callback, Schedule

ENGINES: dict[str, type[Engine]] = {}


@dataclass(frozen=True)
class Params:
    """An engine's options: one frozen dataclass per engine, each field an option with the paper's
    default. `check` raises a UsageError for values the engine cannot run with and changes nothing."""

    def check(self, steps: int) -> None:
        """Raise UsageError for values the engine cannot run with at `steps` steps."""

    @classmethod
    def from_options(cls, engine: str, options: dict | None) -> Params:
        """The parameters from user options (None: not given, the default applies)."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"--{unknown[0].replace('_', '-')} does not apply to engine {engine}")
        return cls(**given)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """Everything an engine needs for one image: model, schedule, source and target branches."""

    model: Family
    schedule: Schedule
    source: Denoiser  # source prompt with the inversion guidance
    target: Denoiser  # target prompt with the editing guidance (the source, to reconstruct)
    params: Params = field(default_factory=Params)
    seed: int = 0
    callback: Callback | None = None
    prompts: tuple[str, str] = ("", "")  # source and target prompt
    scales: tuple[float, float] = (1.0, 1.0)  # their guidance scales
    # Builds a denoiser over several prompts at once (one row each) with the edit's guidance, an
    # optional attention controller and optional per-row scales: engines that edit a source and a
    # target side by side use it (see `denoiser_for`).
    make_denoiser: Callable[..., Denoiser] | None = None
    show_attention: bool = False  # engines with attention control leave maps in `extras`
    # An edit mask on the latent grid ([1, 1, h, w], 1 = may change); outside it every engine keeps
    # the source at each level (`keep`): its inversion trajectory, or the source branch.
    region: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    _made: list = field(default_factory=list)

    def denoiser_for(self, prompts: list[str], controller: Controller | None = None,
                     scales: list[float] | None = None) -> Denoiser:
        """Denoiser over `prompts` (one row each); `scales` overrides the guidance scale per row."""
        denoiser = self.make_denoiser(prompts, controller, scales)
        self._made.append(denoiser)
        return denoiser

    def keep(self, x: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """`x` inside the edit region, `background` (the source at the same level) outside it."""
        if self.region is None:
            return x
        return torch.where(self.region.bool(), x, background.to(x.dtype))

    def trajectory_if_masked(self, trajectory: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """For a record: the source's inversion path (noisiest first) when the edit is masked, since
        a masked edit follows it outside the mask; nothing otherwise (records stay small)."""
        return {"trajectory": torch.cat(trajectory[::-1])} if self.region is not None else {}

    def background(self, tensors: dict[str, torch.Tensor], engine: str) -> torch.Tensor | None:
        """The source's inversion path kept by `trajectory_if_masked` (None for an unmasked edit)."""
        if self.region is None:
            return None
        if "trajectory" not in tensors:
            raise UsageError(f"a masked {engine} edit follows the source's inversion path outside the mask, which a "
                             "record keeps only when inverted with a mask: invert again with --mask")
        return tensors["trajectory"].to(self.model.device)

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
    Params: type[Params] = Params  # the engine's options and their defaults
    default_steps: int = 50
    default_guidance: tuple[float, float] = (1.0, 7.5)  # CFG of the inversion and of the edit

    def model_defaults(self, model: Family) -> tuple[int, tuple[float, float]]:
        """(steps, (inversion CFG, edit CFG)) on this model, or a UsageError for a model the engine
        cannot run on."""
        return self.default_steps, self.default_guidance

    def resolve(self, params: Params, steps: int, model: Family) -> Params:
        """The parameters a run uses: checked, with values that depend on the steps or the model
        filled in (so records and results carry the numbers used)."""
        params.check(steps)
        return params

    def schedule(self, model: Family, steps: int, height: int, width: int, params: Params) -> Schedule:
        """The levels a run steps through: the model's own (an engine with a choice of solver picks
        its levels here)."""
        return model.schedule(steps, height, width)

    def record_tensors(self, steps: int, params: Params, latent: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The tensors `invert` returns for a latent of shape `latent`, with their shapes (a record is
        checked against them before use)."""
        return {}

    def path_levels(self, steps: int, params: Params) -> int:
        """How many levels the source's inversion path holds (`Run.trajectory_if_masked`)."""
        return steps + 1

    def check_record(self, tensors: dict[str, torch.Tensor], steps: int, params: Params, name: str) -> None:
        """A record's tensors against what this engine wrote at these steps: one line naming the tensor."""
        latent = tuple(tensors["latent"].shape)
        expected = self.record_tensors(steps, params, latent)
        if "trajectory" in tensors and "trajectory" not in expected:
            expected["trajectory"] = (self.path_levels(steps, params), *latent[1:])
        for key, shape in expected.items():
            if key not in tensors:
                raise DiffeditError(f"{name}: a {self.name} record holds tensor {key!r}, which is missing")
            found = tuple(tensors[key].shape)
            if found != shape:
                raise DiffeditError(f"{name}: tensor {key!r} is {list(found)} but a {self.name} record of {steps} "
                                    f"steps and latent {list(latent)} holds {list(shape)}")
            if not tensors[key].is_floating_point() and shape:
                raise DiffeditError(f"{name}: tensor {key!r} must hold floats, not {tensors[key].dtype}")

    def invert(self, run: Run, z0: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def edit(self, run: Run, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def register(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls
