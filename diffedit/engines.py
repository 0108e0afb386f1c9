"""The engine interface: every inversion/editing engine is one class in `inversion/`.

An engine turns clean latents into the tensors of records (`invert`) and turns those tensors back
into clean latents under the target branch (`edit`); reconstruction is an edit whose target is the
source. An engine works on a batch of images at once, one latent row each (a lone job is a batch
of one): its per-image state has a batch axis (`stack_tensors`, `split_tensors`), so micro-batched
jobs share every network forward. Engines register themselves by name, so adding one adds only its
file to `diffedit.inversion`, whose `get_engine` resolves a name.
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
    """Everything an engine needs for a batch of images (one latent row each): model, schedule,
    source and target branches over all of them, and each image's prompts and seed."""

    model: Family
    schedule: Schedule
    source: Denoiser  # the source prompts with the inversion guidance, one row per image
    target: Denoiser  # the target prompts with the editing guidance (the source, to reconstruct)
    params: Params = field(default_factory=Params)
    seeds: tuple[int, ...] = (0,)  # per image: the noise an engine draws for it is its own
    callback: Callback | None = None
    sources: tuple[str, ...] = ("",)  # source prompt per image
    targets: tuple[str, ...] = ("",)  # target prompt per image
    scales: tuple[float, float] = (1.0, 1.0)  # the source's and the target's guidance scales
    # Builds a denoiser over several prompts at once (one row each) with the edit's guidance, an
    # optional attention controller and optional per-row scales: engines that edit sources and
    # targets side by side use it (see `denoiser_for`).
    make_denoiser: Callable[..., Denoiser] | None = None
    show_attention: bool = False  # engines with attention control leave maps in `extras`
    # An edit mask on the latent grid ([1, 1, h, w], 1 = may change); outside it every engine keeps
    # the source at each level (`keep`): its inversion trajectory, or the source branch.
    region: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    _made: list = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.seeds)

    @property
    def reconstructs(self) -> bool:
        """Every target is its source, at the source's scale: the edit is a reconstruction."""
        return self.sources == self.targets and self.scales[0] == self.scales[1]

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its seed (as a lone job seeds its own)."""
        return [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]

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
        """For a record: the source's inversion path (noisiest first, levels x images) when the edit is
        masked, since a masked edit follows it outside the mask; nothing otherwise (records stay small)."""
        return {"trajectory": torch.stack(trajectory[::-1])} if self.region is not None else {}

    def background(self, tensors: dict[str, torch.Tensor], engine: str) -> torch.Tensor | None:
        """The source's inversion path kept by `trajectory_if_masked`, [levels, images, ...] (None for an
        unmasked edit)."""
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
        """The record tensors of the clean latents `z0` ([images, C, H, W]), batched (`stack_tensors`)."""
        raise NotImplementedError

    def edit(self, run: Run, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The edited clean latents [images, C, H, W] from batched record tensors (with `latent`)."""
        raise NotImplementedError


def draw(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """A standard normal draw shaped as `like` ([images, ...]), each image's row from its own generator:
    what a lone job of that image draws, whatever else shares its batch."""
    shape = (1, *like.shape[1:])
    return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(like.device)


# Record tensors that hold an image's levels along their first axis ([levels, C, H, W]); in a batch
# they gain an image axis after it. Every other tensor has its image axis where a latent has it
# (fourth from the end) and 0-d tensors are shared by the batch.
LEVELS = ("trajectory",)


def stack_tensors(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several images' record tensors as one batch (the form engines take and return)."""
    out = {}
    for key, first in records[0].items():
        parts = [r[key] for r in records]
        if first.ndim == 0:
            if any(not torch.equal(p, first) for p in parts):
                raise ValueError(f"records disagree on {key!r}: they cannot share a batch")
            out[key] = first
        else:
            out[key] = torch.stack(parts, 1) if key in LEVELS else torch.cat(parts, -4)
    return out


def split_tensors(tensors: dict[str, torch.Tensor], images: int) -> list[dict[str, torch.Tensor]]:
    """A batch's tensors as each image's record tensors (`stack_tensors` undone)."""
    def part(key, t, k):
        if t.ndim == 0:
            return t
        return t[:, k].clone() if key in LEVELS else t.narrow(-4, k, 1).clone()

    return [{key: part(key, t, k) for key, t in tensors.items()} for k in range(images)]


def register(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls
