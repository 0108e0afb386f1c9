"""Options and helpers shared by the command modules: model loading, progress, result printing."""

from __future__ import annotations

import functools
import inspect
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True)

SEED_MAX = 2**64 - 1  # diffusers' generators take seeds in [0, 2^64)
SCALE_LIMIT = 1000.0  # any guidance scale beyond this is a typo, and overflows half precision


def finite_scale(value: float | None) -> float | None:
    """Typer callback: a guidance scale must be a finite number of sensible size (checked before any
    model loads)."""
    if value is not None and not (math.isfinite(value) and abs(value) <= SCALE_LIMIT):
        raise typer.BadParameter(f"{value} is not a guidance scale: give a finite number within ±{SCALE_LIMIT:g}")
    return value


# Help panels: each command shows its own common options first, then these groups, in this order.
ENGINE_PANEL = "Engine options (each applies to the engines it names)"
GUIDANCE_PANEL = "Guidance"
MODEL_PANEL = "Model loading"
INPUT_PANEL = "Input image"
FK_PANEL = "Feynman-Kac steering"
MASK_PANEL = "Edit mask (a local edit: the rest of the image is kept)"

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Hub id, diffusers folder or .safetensors file (default: the shipped toy model).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.", rich_help_panel=MODEL_PANEL)]
DtypeOpt = Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16 (the integrator stays fp32).", rich_help_panel=MODEL_PANEL)]
OffloadOpt = Annotated[str | None, typer.Option("--offload", help="Keep the weights in CPU memory, on the device only while they run: model (one model at a time) or sequential (one layer at a time: least memory, slowest).", rich_help_panel=MODEL_PANEL)]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled .bin weights in a model folder, which can run code (single files must be .safetensors).", rich_help_panel=MODEL_PANEL)]
DecoderInversionOpt = Annotated[int | None, typer.Option("--decoder-inversion", min=0, max=1000, help="Refine each encoded image's latent by this many gradient steps until it decodes to the image (a higher ceiling for every inversion; each step costs a decoder forward and backward). Default: the model folder's setting, else 0.", rich_help_panel=MODEL_PANEL)]
VaeTilingOpt = Annotated[bool, typer.Option("--vae-tiling", help="Encode/decode large images in overlapping tiles (bounded VAE memory; tiles blend, so results differ slightly).", rich_help_panel=MODEL_PANEL)]
ConfigOpt = Annotated[str | None, typer.Option("--model-config", help="Diffusers folder or hub id with the configs of a single-file checkpoint.", rich_help_panel=MODEL_PANEL)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")]
JsonOutOpt = Annotated[Path | None, typer.Option("--json-out", help="Write the JSON result to a file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only: no progress bar, spinner or warnings.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
# The engines of diffedit.inversion (tests/test_cli.py checks this list against the registry; the
# CLI does not import the engines just to print help).
ENGINES_HELP = "ddim, ddpm-ef, bdia, direct, ddim-p2p, infedit, rf-inversion or flowedit"
EngineOpt = Annotated[str, typer.Option("--engine", "-e", help=f"Engine: {ENGINES_HELP} (see the README).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", "-n", min=1, max=1000, help="Number of steps (default: the engine's; generate: 50).")]
# Engine parameters: each applies to some engines only, and a wrong pairing is a usage error.
SkipOpt = Annotated[int | None, typer.Option("--skip", min=0, help="ddpm-ef: start the edit this many steps late (keeps more of the input; default 36 % of the steps, as in the paper).", rich_help_panel=ENGINE_PANEL)]
EtaOpt = Annotated[float | None, typer.Option("--eta", help="ddpm-ef/infedit: churn (default 1); rf-inversion: edit controller strength (0.9).", rich_help_panel=ENGINE_PANEL)]
GammaOpt = Annotated[float | None, typer.Option("--gamma", help="bdia: backward weight in (0, 1] (0.94); rf-inversion: inversion controller strength (0.5).", rich_help_panel=ENGINE_PANEL)]
StrengthOpt = Annotated[float | None, typer.Option("--strength", help="bdia: fraction of the steps inverted and regenerated (0.8, as the paper's editing code; 1 = from pure noise).", rich_help_panel=ENGINE_PANEL)]
StartOpt = Annotated[float | None, typer.Option("--start", help="rf-inversion: first fraction of steps with the edit controller (0).", rich_help_panel=ENGINE_PANEL)]
StopOpt = Annotated[float | None, typer.Option("--stop", help="rf-inversion: fraction of steps where the edit controller stops (0.25).", rich_help_panel=ENGINE_PANEL)]
SolverOpt = Annotated[str | None, typer.Option("--solver", help="ddim: how inversion and sampling step, ddim (first order, the default) or dpmpp-2m (DPM-Solver++ 2M multistep on its own levels, as diffusers' DPMSolverMultistep schedulers; SD1/SD2/SDXL). Records keep it.", rich_help_panel=ENGINE_PANEL)]
FixedPointOpt = Annotated[int | None, typer.Option("--fixed-point", help="ddim (--solver ddim): fixed-point updates per inversion step (0-10) towards the exact inverse of the sampler's step; each costs one network evaluation per step. 0, the default, inverts as diffusers' DDIMInverseScheduler does.", rich_help_panel=ENGINE_PANEL)]
NMaxOpt = Annotated[int | None, typer.Option("--n-max", help="flowedit: edit over the last N steps (SD3 33 of 50, Flux 24 of 28; other step counts keep that fraction).", rich_help_panel=ENGINE_PANEL)]
NMinOpt = Annotated[int | None, typer.Option("--n-min", help="flowedit: finish with N steps of plain sampling (0).", rich_help_panel=ENGINE_PANEL)]
ShareStepsOpt = Annotated[int | None, typer.Option("--share-steps", help="rf-solver/fireflow: editing steps whose attention values come from the source (5 / 1).", rich_help_panel=ENGINE_PANEL)]
ShareFromOpt = Annotated[float | None, typer.Option("--share-from", help="rf-solver/fireflow: share values from this fraction of the blocks' depth on (20/38 / 0).", rich_help_panel=ENGINE_PANEL)]
NAvgOpt = Annotated[int | None, typer.Option("--n-avg", help="flowedit: average N velocity differences per step (1).", rich_help_panel=ENGINE_PANEL)]
AdapterOpt = Annotated[list[str] | None, typer.Option("--adapter", help="SPM concept-erasure adapter (.spm.safetensors from `diffedit erase train`); repeatable: several concepts at once.", rich_help_panel=MODEL_PANEL)]
TransportOpt = Annotated[str, typer.Option("--transport", help="SPM facilitated transport: calibrated (each adapter's strength per prompt from its similarity to the erased concept; the empty prompt gets 0), paper (the paper's raw cosine) or off (adapters always fully on).", rich_help_panel=MODEL_PANEL)]
LcmStepsOpt = Annotated[int | None, typer.Option("--lcm-original-steps", min=1, max=1000, help="Latent-consistency models only: the distillation grid the steps are picked from (the scheduler's, usually 50).", rich_help_panel=MODEL_PANEL)]
LoraOpt = Annotated[list[str] | None, typer.Option("--lora", help="LoRA file (.safetensors; diffusers/PEFT or kohya names) fused into the model; FILE:SCALE sets its strength (default 1); repeatable.", rich_help_panel=MODEL_PANEL)]
LcmLoraOpt = Annotated[str | None, typer.Option("--lcm-lora", help="LCM-LoRA file: fused into the base model (SD1/SD2/SDXL), which then samples as a latent-consistency model (2-8 steps; its guidance is distilled in, so use -g 1 to 2).", rich_help_panel=MODEL_PANEL)]
FitOpt = Annotated[str, typer.Option("--fit", help="How the image meets the model's size multiple; outputs keep the input's size either way: pad (edge pixels, cropped away again), resize (and back) or crop (the centre; the cut border is filled from the result's edge).", rich_help_panel=INPUT_PANEL)]
AlphaOpt = Annotated[str, typer.Option("--alpha", help="Transparent images: composite (on white) or refuse.", rich_help_panel=INPUT_PANEL)]
MaskOpt = Annotated[str | None, typer.Option("--mask", help="PNG of the image's size: white (or opaque) where the image may change.", rich_help_panel=MASK_PANEL)]
MaskWordsOpt = Annotated[str | None, typer.Option("--mask-from-prompt", help="Instead of --mask: the region where WORD(S) of the source prompt attend (cross-attention); check it with `diffedit mask`.", rich_help_panel=MASK_PANEL)]
MaskDilateOpt = Annotated[int, typer.Option("--mask-dilate", min=0, max=512, help="Grow the mask by this many pixels.", rich_help_panel=MASK_PANEL)]
MaskFeatherOpt = Annotated[int | None, typer.Option("--mask-feather", min=0, max=512, help="Fade the edit into the image over this many pixels outside the mask (0: a hard edge; default: one latent cell, 8 px on Stable Diffusion).", rich_help_panel=MASK_PANEL)]
InvertMaskOpt = Annotated[bool, typer.Option("--invert-mask", help="Change the image outside the mask instead.", rich_help_panel=MASK_PANEL)]
ShowMaskOpt = Annotated[Path | None, typer.Option("--show-mask", help="Write the input with the (feathered) mask tinted over it to this PNG.", rich_help_panel=MASK_PANEL)]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed (noise drawn on the CPU like diffusers).")]


GuidanceOpt = Annotated[str, typer.Option("--guidance", help="cfg, cfgpp (scale = lambda in [0, 1]), pag or cfgpp+pag.", rich_help_panel=GUIDANCE_PANEL)]
PagScaleOpt = Annotated[float, typer.Option("--pag-scale", callback=finite_scale, help="PAG scale s in u + w(c - u) + s(c - p).", rich_help_panel=GUIDANCE_PANEL)]
PagLayersOpt = Annotated[str, typer.Option("--pag-layers", help="Comma-separated regexes over self-attention layer names.", rich_help_panel=GUIDANCE_PANEL)]
AdaptiveGuidanceOpt = Annotated[float | None, typer.Option("--adaptive-guidance", help="Adaptive guidance: drop CFG's unconditional branch once its clean-image estimate's cosine similarity with the conditional one reaches this (e.g. 0.999).", rich_help_panel=GUIDANCE_PANEL)]
DeepCacheOpt = Annotated[int | None, typer.Option("--deepcache", help="DeepCache: run the whole UNet every N-th step, only its outer blocks in between (e.g. 3).", rich_help_panel=GUIDANCE_PANEL)]
PagAdaptiveOpt = Annotated[float, typer.Option("--pag-adaptive-scale", help="Lower the PAG scale by this much per unit of time.", rich_help_panel=GUIDANCE_PANEL)]


FKParticlesOpt = Annotated[int, typer.Option("--fk-particles", help="Feynman-Kac steering with K particles (1 = off).", rich_help_panel=FK_PANEL)]
FKLambdaOpt = Annotated[float, typer.Option("--fk-lambda", help="FK: reward temperature lambda.", rich_help_panel=FK_PANEL)]
FKPotentialOpt = Annotated[str, typer.Option("--fk-potential", help="FK: diff, max or sum.", rich_help_panel=FK_PANEL)]
FKEveryOpt = Annotated[int, typer.Option("--fk-every", help="FK: resample every N steps (in the first 80 %).", rich_help_panel=FK_PANEL)]
RewardOpt = Annotated[str, typer.Option("--reward", help="FK reward: saturation, brightness, checker (toy world) or module:function.", rich_help_panel=FK_PANEL)]


def fk_config(particles: int, lam: float, potential: str, every: int, eta: float | None):
    """FK settings, or None when steering is off (FK needs a stochastic sampler: eta 1 unless given)."""
    from diffedit.guidance.fk import FKConfig

    if particles <= 1:
        return None
    config = FKConfig(particles, lam, potential, every, eta=eta or 1.0)
    config.check()
    return config


def guidance_spec(kind: str, pag_scale: float, pag_layers: str, pag_adaptive_scale: float,
                  adaptive_threshold: float | None = None):
    from diffedit.guidance import GuidanceSpec

    layers = tuple(p.strip() for p in pag_layers.split(",") if p.strip())
    return GuidanceSpec(kind, pag_scale, layers, pag_adaptive_scale, adaptive_threshold)  # checked before the model loads


def engine_params(**params) -> dict:
    """The engine options the user gave (None = not given)."""
    return {k: v for k, v in params.items() if v is not None}


# Commands that can run several jobs as one micro-batch: name -> (runner taking a list of the
# command's parameter dicts, the parameters jobs of one batch may differ in, which jobs qualify: a
# falsy value runs the job alone, any other value is a kind that batches only with its own kind).
BATCHED: dict = {}

_loaded: dict | None = None  # models kept for reuse while a batch runs


def load(model: str | None, device: str, dtype: str, allow_pickle: bool, config: str | None,
         vae_tiling: bool = False, compile: bool = False, adapters: list[str] | None = None,
         transport: str = "calibrated", lcm_original_steps: int | None = None,
         loras: list[str] | None = None, lcm_lora: str | None = None, quiet: bool = False,
         offload: str | None = None, decoder_inversion: int | None = None):
    """The model of a command, with its LoRAs fused and SPM adapters attached (or none: a reused
    model keeps none)."""
    from diffedit import lora
    from diffedit.editing.spm import apply_files
    from diffedit.models import load_model

    fused = [lora.parse_spec(spec) for spec in loras or []]
    key = (model, device, dtype, allow_pickle, config, tuple(fused), lcm_lora, offload)
    m = _loaded.get(key) if _loaded is not None else None
    if m is None:
        with stderr.status("loading model", spinner="dots") if stderr.is_terminal and not quiet else _nothing():
            m = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
                           loras=fused, lcm_lora=lcm_lora, offload=offload)
        if _loaded is not None:
            _loaded[key] = m
    # set on every call: a model reused by a batch keeps no tiling or decoder-inversion choice from an earlier job
    m.decoder_inversion = m.folder_decoder_inversion if decoder_inversion is None else decoder_inversion
    if vae_tiling:
        m.pipe.vae.enable_tiling()
    else:
        m.pipe.vae.disable_tiling()
    if compile:  # compiled once per loaded model: a batch pays the compilation for its first job only
        m.compile()
    else:
        m.use_compiled = False
    apply_files(m, adapters, transport)  # set on every call too: a batch's next job may name other adapters
    m.use_lcm_grid(lcm_original_steps)
    return m


@dataclass(frozen=True)
class ModelChoice:
    """The model options of every command that loads a model (`--model` and the "Model loading"
    panel), as `with_model_options` collects them."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    model_config: str | None = None
    vae_tiling: bool = False
    adapter: list[str] | None = None
    transport: str = "calibrated"
    lcm_original_steps: int | None = None
    lora: list[str] | None = None
    lcm_lora: str | None = None
    offload: str | None = None
    decoder_inversion: int | None = None

    @classmethod
    def of(cls, params: dict) -> ModelChoice:
        """The choice among a command's parameters (a batch hands them over as one dict)."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    def load(self, record=None, compile: bool = False, quiet: bool = False):
        """The model; with a record, its model and LoRAs unless the options name others (`quiet`: no
        spinner while it loads)."""
        source, loras, lcm_lora = self.model, self.lora, self.lcm_lora
        if record is not None:
            made_with = record.meta["model"]
            if source is None and made_with.get("local") and not Path(made_with["source"]).exists():
                from diffedit.errors import DiffeditError

                raise DiffeditError(f"{record.name}: its model {made_with['source']} is not there (a record names a "
                                    "local model relative to itself); give the model with --model")
            source = source or made_with["source"]
            loras, lcm_lora = record_loras(record, loras, lcm_lora)
        return load(source, self.device, self.dtype, self.allow_pickle, self.model_config, self.vae_tiling, compile,
                    self.adapter, self.transport, self.lcm_original_steps, loras, lcm_lora, quiet, self.offload,
                    self.decoder_inversion)


MODEL_OPTIONS = {  # name: (option, default): the fields of ModelChoice as command parameters
    "model": (ModelOpt, None), "device": (DeviceOpt, "auto"), "dtype": (DtypeOpt, "auto"),
    "allow_pickle": (PickleOpt, False), "model_config": (ConfigOpt, None), "vae_tiling": (VaeTilingOpt, False),
    "adapter": (AdapterOpt, None), "transport": (TransportOpt, "calibrated"),
    "lcm_original_steps": (LcmStepsOpt, None), "lora": (LoraOpt, None), "lcm_lora": (LcmLoraOpt, None),
    "offload": (OffloadOpt, None), "decoder_inversion": (DecoderInversionOpt, None),
}


def option_group(parameter: str, group: type, options: dict):
    """A decorator that gives a command a group of options defined once: its `parameter` (typed as
    the dataclass `group`) becomes the `options` (name: (option, default); Typer reads the signature)
    and is handed back to the command as one `group`."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != parameter]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=default)
                 for name, (option, default) in options.items()]

        @functools.wraps(command)
        def run(**params):
            chosen = group(**{name: params.pop(name) for name in options})
            return command(**params, **{parameter: chosen})

        del run.__wrapped__  # Typer must read the new signature, not the command's
        run.__signature__ = signature.replace(parameters=[*own, *added])
        run.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return run

    return decorate


def record_loras(rec, loras: list[str] | None, lcm_lora: str | None) -> tuple[list[str] | None, str | None]:
    """The LoRAs to load for a record: the ones given, else the ones the record was made with."""
    if loras or lcm_lora:
        return loras, lcm_lora
    made = rec.meta["model"].get("loras", [])
    plain = [f"{entry['path']}:{entry['scale']}" for entry in made if not entry.get("lcm")]
    lcm = next((entry["path"] for entry in made if entry.get("lcm")), None)
    return plain or None, lcm


@contextmanager
def reuse_models():
    """Within this block every command reuses the models loaded before (a batch loads each once)."""
    global _loaded
    _loaded = {}
    try:
        yield
    finally:
        _loaded = None


@contextmanager
def _nothing():
    yield


@contextmanager
def progress(total: int, label: str, quiet: bool):
    """A Rich progress bar on stderr; yields the callback the sampling loops call after each step.

    Only on a terminal: in pipes and logs a bar is noise (and Rich would leave blank lines).
    """
    if quiet or not stderr.is_terminal:
        yield None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda i, x, x0: bar.advance(task)


def default_output(source, command: str, suffix: str = ".png") -> str:
    """The one naming rule for outputs not given with -o: beside the input, `STEM.COMMAND.png` (a
    record's stem is its image's: `photo.inv.safetensors` -> `photo.reconstruct.png`); from stdin, -o
    is needed."""
    from diffedit.errors import UsageError

    if source is None or str(source) == "-":
        raise UsageError("reading from stdin: give the output with -o (a file, or - for stdout)")
    path = Path(source)
    return str(path.with_name(f"{path.name.split('.')[0]}.{command}{suffix}"))


def generated_name(prompt: str, seed: int | None) -> str:
    """`generate`'s default output: a slug of the prompt and the seed, in the current folder."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "image"
    return f"{slug}-{seed}.png"


def inputs_exist(*paths) -> None:
    """Answer a missing or empty input file at once, before the heavy imports and the model load."""
    from diffedit.files import check_readable

    for path in paths:
        check_readable(path)


def warn_prompts(model, prompts: list[str], quiet: bool) -> None:
    """Warn (on stderr, unless quiet) about words the model's tokenizer cannot read as written."""
    from diffedit.tokenizers import prompt_warnings

    if quiet:
        return
    for prompt in dict.fromkeys(p for p in prompts if p):
        for line in prompt_warnings(getattr(model.pipe, "tokenizer", None), prompt):
            stderr.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


def emit(result: dict, as_json: bool, to_stderr: bool = False) -> None:
    """Print a result: JSON for scripts, one readable line otherwise (stderr when stdout holds data)."""
    text = _json_text(result) if as_json else "  ".join(f"{k}={_fmt(v)}" for k, v in result.items())
    typer.echo(text, err=to_stderr)


def _json_text(result: dict) -> str:
    identical = [k for k, v in result.items() if isinstance(v, float) and math.isinf(v) and v > 0]
    if identical:  # JSON has no infinity: say what its null means
        result = {**result, "identical": identical}
    return json.dumps({k: _jsonable(v) for k, v in result.items()})


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


with_model_options = option_group("models", ModelChoice, MODEL_OPTIONS)


@dataclass(frozen=True)
class MaskChoice:
    """The edit-mask options of `invert` and `edit` (the "Edit mask" panel), as `with_mask_options`
    collects them."""

    mask: str | None = None
    mask_from_prompt: str | None = None
    mask_dilate: int = 0
    mask_feather: int | None = None
    invert_mask: bool = False
    show_mask: Path | None = None

    def given(self) -> bool:
        return self.mask is not None or self.mask_from_prompt is not None

    def input(self, paste_back: bool = True):
        """The job's MaskInput, or None without a mask; a usage error for contradicting options."""
        from diffedit.errors import UsageError
        from diffedit.jobs import MaskInput
        from diffedit.masks import MaskOptions

        if self.mask is not None and self.mask_from_prompt is not None:
            raise UsageError("give either --mask FILE or --mask-from-prompt WORDS, not both")
        if not self.given():
            if self.show_mask is not None:
                raise UsageError("--show-mask needs --mask or --mask-from-prompt")
            return None
        options = MaskOptions(self.mask_dilate, self.mask_feather, self.invert_mask)
        options.check()
        return MaskInput(self.mask, self.mask_from_prompt, options, paste_back)


MASK_OPTIONS = {  # name: (option, default): the fields of MaskChoice as command parameters
    "mask": (MaskOpt, None), "mask_from_prompt": (MaskWordsOpt, None), "mask_dilate": (MaskDilateOpt, 0),
    "mask_feather": (MaskFeatherOpt, None), "invert_mask": (InvertMaskOpt, False), "show_mask": (ShowMaskOpt, None),
}
with_mask_options = option_group("masking", MaskChoice, MASK_OPTIONS)


@dataclass(frozen=True)
class ReportChoice:
    """Where a command's result goes (`--json`, `--json-out`), as `with_report_options` collects them:
    JSON on stdout, or in a file; never mixed into an image on stdout."""

    json: bool = False
    json_out: Path | None = None

    @classmethod
    def of(cls, params: dict) -> ReportChoice:
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    def check(self, output, overwrite: bool) -> None:
        """Before any work: `--json` with the image on stdout (-o -) is a usage error; the JSON file must
        be writable."""
        from diffedit.errors import UsageError
        from diffedit.files import check_writable

        if self.json and str(output) == "-":
            raise UsageError("--json prints on stdout, which carries the image with -o -: use --json-out FILE")
        if self.json_out is not None:
            if str(self.json_out) == "-":
                raise UsageError("--json-out takes a file; --json prints the result on stdout")
            check_writable(self.json_out, overwrite)

    def emit(self, result: dict, output, quiet: bool, overwrite: bool = False) -> None:
        """Say on stderr (unless quiet) when the model worked on another size than the input's; then the
        result: a readable line (on stderr when stdout carries the image), or JSON on stdout, and JSON in
        the --json-out file."""
        if "canvas" in result and not quiet:
            size, canvas = result["size"], result["canvas"]
            verb = {"pad": "padded", "resize": "resized", "crop": "cropped"}[result["fit"]]
            stderr.print(f"note: {size['width']}x{size['height']} is not a multiple of this model's size step: "
                         f"{verb} to {canvas['width']}x{canvas['height']} for the model, output at "
                         f"{size['width']}x{size['height']}", markup=False, highlight=False, soft_wrap=True)
        if self.json_out is not None:
            from diffedit.files import atomic_output

            with atomic_output(self.json_out, overwrite) as tmp:
                tmp.write_text(_json_text(result) + "\n", encoding="utf-8")
        if self.json or self.json_out is None:
            emit(result, self.json, to_stderr=str(output) == "-")


def check_job_outputs(job: dict) -> None:
    """Before any work: a job's report options and its output file (not stdout) are usable."""
    from diffedit.files import check_writable

    ReportChoice.of(job).check(job["output"], job["overwrite"])
    if str(job["output"]) != "-":
        check_writable(job["output"], job["overwrite"])


REPORT_OPTIONS = {"json": (JsonOpt, False), "json_out": (JsonOutOpt, None)}  # the fields of ReportChoice
with_report_options = option_group("report", ReportChoice, REPORT_OPTIONS)
