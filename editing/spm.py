"""SPM: concept erasure with one-dimensional adapters ("semi-permeable membranes", Lyu et al. 2024).

A membrane is a rank-1 branch `up(down(x))` added to the output of every Linear and Conv2d inside the
network's transformer blocks (UNets: every `Transformer2DModel` - proj_in/out, self- and
cross-attention q/k/v/out, feed-forward; SD3/Flux: every transformer block). `up` starts at zero,
so a fresh membrane is the identity. One file per concept (`.spm.safetensors`), loadable onto any
model of the family it was trained on.

Multiplier semantics (decided here, see the methods notes): a multiplier `m` scales the membrane's
*product* once, `out + m * (alpha / rank) * up(down(x))`. The paper's inference code scales both
factors' weights, which scales the product by `m^2`; linear scaling keeps `m = 0.5` meaning "half
the membrane" and makes several membranes on one layer a plain sum of their multiplied branches.

Facilitated transport: each membrane's multiplier is set per prompt, i.e. per row of the network's
batch (CFG's conditional and unconditional branches each get their own), by `transport`:
  - `paper`: max(cos of the flattened text embeddings, token overlap) against the erased prompts
    (the paper's "clipcos_tokenuni");
  - `calibrated` (default): the same with the cosine rescaled against the empty prompt's,
    `clamp((cos(p, c) - cos("", c)) / (1 - cos("", c)), 0, 1)`, so the empty prompt gets exactly 0 and
    a prompt counts as similar only in so far as it is closer to the concept than the empty prompt is
    (on the toy model the raw cosine is 0.98 for "" and 0.75-0.88 for unrelated prompts against
    "red": the paper's metric leaves every membrane almost fully open);
  - `off`: multiplier 1 for every row (the membrane always on).
The multipliers travel with the conditioning (`Cond.tensors["spm"]`, one column per membrane, set
when prompts are encoded) and the Denoiser hands them to the hooks around each forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffedit import __version__
from diffedit.errors import DiffeditError, UsageError

FORMAT = "diffedit-spm"
VERSION = 1
TRANSPORTS = ("calibrated", "paper", "off")
KEY = "spm"  # the Cond tensor holding each row's multipliers


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


# -- attaching: hooks that add the branches ----------------------------------------------------------
class Membranes:
    """Membranes attached to a model's network by forward hooks, removable (bit-identical after).

    Each forward adds `sum_k m[row, k] * (alpha_k / rank) * up_k(down_k(x))` to each target layer's
    output, with `m` the rows' multipliers (see `rows`); without rows every membrane is fully on.
    """

    def __init__(self, model, membranes: list[Membrane], transport: str = "calibrated"):
        if transport not in TRANSPORTS:
            raise UsageError(f"--transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})")
        for m in membranes:
            m.check_fits(model)
        self.model, self.items, self.transport = model, membranes, transport
        self._rows: torch.Tensor | None = None
        self._scaled: dict = {}  # the rows' multipliers by (batch, device, dtype), for the current forward
        self.enabled = True
        self._hooks = []
        self._ft = None
        layers = target_layers(model.network)
        device, dtype = model.device, model.dtype
        self._weights = {}
        for name, layer in layers.items():
            # trainable membranes (float32 parameters on the device) are used as they are
            downs = [m.weights[name][0] for m in membranes]
            ups = [m.weights[name][1] for m in membranes]
            self._weights[name] = (downs, ups)
            self._hooks.append(layer.register_forward_hook(self._hook(name, isinstance(layer, nn.Conv2d))))
        self._scales = [m.alpha / m.rank for m in membranes]
        self._cast = {}  # inference copies in the network's dtype, made once
        if not any(t.requires_grad for m in membranes for t in m.parameters()):
            for name, (downs, ups) in self._weights.items():
                self._cast[name] = (torch.cat(downs).to(device, dtype), torch.cat(ups, dim=1).to(device, dtype))

    def __len__(self) -> int:
        return len(self.items)

    def _hook(self, name: str, conv: bool):
        def hook(module, args, out):
            if not self.enabled:
                return None
            x = args[0]
            if name in self._cast:
                down, up = self._cast[name]
            else:
                downs, ups = self._weights[name]
                down, up = torch.cat(downs).to(x.dtype), torch.cat(ups, dim=1).to(x.dtype)
            scale = self._multipliers(x.shape[0], x.device, x.dtype)  # [B, K]
            if conv:
                h = nn.functional.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                h = h * scale[:, :, None, None]
                return out + nn.functional.conv2d(h, up)
            h = nn.functional.linear(x, down)  # [B, ..., K]
            h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])
            return out + nn.functional.linear(h, up)

        return hook

    def _multipliers(self, batch: int, device, dtype) -> torch.Tensor:
        """[batch, K]: multiplier x alpha / rank of each membrane for each row of this forward."""
        key = (batch, device, dtype)
        cached = self._scaled.get(key)
        if cached is not None:
            return cached
        scales = torch.tensor(self._scales, device=device, dtype=dtype)
        if self._rows is None:
            out = scales.expand(batch, -1)
        else:
            rows = self._rows
            if rows.shape[0] != batch:
                if batch % rows.shape[0]:
                    raise DiffeditError(f"SPM: {rows.shape[0]} multiplier rows for a batch of {batch}")
                rows = rows.repeat_interleave(batch // rows.shape[0], dim=0)
            out = rows.to(device, dtype) * scales
        self._scaled[key] = out  # every layer of this forward reuses it
        return out

    @contextmanager
    def rows(self, multipliers: torch.Tensor | None):
        """Within this block, batch row b uses `multipliers[b, k]` for membrane k (None: all 1)."""
        before = self._rows, self._scaled
        self._rows, self._scaled = multipliers, {}
        try:
            yield
        finally:
            self._rows, self._scaled = before

    @contextmanager
    def off(self):
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, "membranes", None) is self:
            self.model.membranes = None

    # -- facilitated transport -------------------------------------------------------------------
    def multipliers(self, prompts: list[str], text: torch.Tensor | None) -> torch.Tensor:
        """[len(prompts), K]: each membrane's multiplier for each prompt (`text`: their embeddings)."""
        k = len(self.items)
        if self.transport == "off" or not prompts:
            return torch.ones(len(prompts), k)
        ft = self._ft or self._prepare_ft()
        out = torch.zeros(len(prompts), k)
        flat = text.detach().float().flatten(1).cpu() if text is not None else None
        for j, (erased, tokens, embeds, base_cos) in enumerate(ft):
            for i, prompt in enumerate(prompts):
                mine = self._tokens(prompt)
                best = 0.0
                for e_tokens, e_embed, c0 in zip(tokens, embeds, base_cos):
                    overlap = len(mine & e_tokens) / len(e_tokens) if e_tokens else 0.0
                    cos = float(nn.functional.cosine_similarity(flat[i], e_embed, dim=0)) if flat is not None else 0.0
                    if self.transport == "calibrated":
                        cos = min(max((cos - c0) / (1 - c0), 0.0), 1.0) if c0 < 1 else float(cos >= 1)
                    best = max(best, cos, overlap)
                out[i, j] = best
        return out

    def _tokens(self, prompt: str) -> set[int]:
        tok = self.model.pipe.tokenizer if getattr(self.model.pipe, "tokenizer", None) is not None \
            else self.model.pipe.tokenizer_2
        special = set(tok.all_special_ids)
        return set(tok(prompt, truncation=True).input_ids) - special

    def _prepare_ft(self):
        ft = []
        h, w = self.model.default_size()
        with torch.inference_mode():
            empty = self.model.encode_prompts([""], None, h, w)[0].tensors["text"].float().flatten(1).cpu()[0]
            for m in self.items:
                cond = self.model.encode_prompts(m.prompts, None, h, w)[0].tensors["text"].float().flatten(1).cpu()
                base = [float(nn.functional.cosine_similarity(empty, e, dim=0)) for e in cond]
                ft.append((m.prompts, [self._tokens(p) for p in m.prompts], list(cond), base))
        self._ft = ft
        return ft

    def tag(self, cond, prompts: list[str]):
        """The Cond with each row's multipliers added (`Cond.tensors["spm"]`)."""
        if cond is None:
            return None
        mult = self.multipliers(prompts, cond.tensors.get("text"))
        return type(cond)({**cond.tensors, KEY: mult.to(next(iter(cond.tensors.values())).device)})

    def describe(self) -> list[dict]:
        return [{"concept": m.concept, "file": Path(m.name).name if m.name else None, "digest": m.digest}
                for m in self.items]


def attach(model, membranes: list[Membrane], transport: str = "calibrated") -> Membranes | None:
    """Put `membranes` on the model (replacing any attached before); none: just remove the old ones."""
    detach(model)
    if not membranes:
        return None
    model.membranes = Membranes(model, membranes, transport)
    return model.membranes


def detach(model) -> None:
    current = getattr(model, "membranes", None)
    if current is not None:
        current.remove()


def apply_files(model, paths: list[str] | None, transport: str = "calibrated") -> Membranes | None:
    """What `--adapter FILE ...` does: load, check and attach (or clear what an earlier job attached)."""
    if transport not in TRANSPORTS:
        raise UsageError(f"--transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})")
    return attach(model, load_membranes(paths or []), transport)


# -- training --------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Defaults from the paper (SD1.4 configs) except where the toy model needs fewer iterations."""

    iterations: int = 3000
    lr: float = 1e-4
    warmup: int = 500
    cycles: int = 3  # cosine with hard restarts
    steps: int = 30  # DDIM schedule x_t is sampled on
    sample_guidance: float = 3.0  # CFG while sampling x_t with the membrane on
    g: float = 1.0  # erase guidance: target = neutral - g (positive - neutral)
    anchors: int = 4  # latent anchors per iteration
    anchor_weight: float = 1000.0
    seed: int = 0
    size: int | None = None  # image side (default: the model's)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine with `cycles` hard restarts (as diffusers' schedule of that name)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.iterations - config.warmup)
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((config.cycles * progress) % 1.0)))


def sample_anchors(target: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n anchor embeddings around `target` [L, D]: a random direction, accepted with probability
    1 - cos(target, direction) (far ones preferred), scaled to the target's norm x U(0.8, 1.2)."""
    flat = target.flatten().float().cpu()
    norm = flat.norm()
    out = []
    while len(out) < n:
        d = torch.randn(flat.shape, generator=gen)
        d = d / d.norm()
        cos = float(torch.dot(d, flat) / norm)
        if float(torch.rand((), generator=gen)) < 1 - cos:
            scale = 0.8 + 0.4 * float(torch.rand((), generator=gen))
            out.append((d * norm * scale).view_as(target))
    return torch.stack(out).to(target.device, target.dtype)


def _concept_pattern(concept: str) -> re.Pattern:
    """The concept as whole words ("red" is not found in "hundred"), any case."""
    return re.compile(r"(?<!\w)" + re.escape(concept.strip()) + r"(?!\w)", re.IGNORECASE)


def _neutral(prompt: str, concept: str, surrogate: str) -> str:
    """The prompt with the concept replaced by the surrogate (the bare concept gives the surrogate)."""
    return " ".join(_concept_pattern(concept).sub(surrogate, prompt).split())


def train(
    model, concept: str, surrogate: str = "", *, prompts: list[str] | None = None, config: TrainConfig = TrainConfig(),
    checkpoint: str | Path | None = None, every: int = 50, stop_after: int | None = None,
    tick: Callable[[int, int, float], None] | None = None,
) -> tuple[Membrane, dict]:
    """Train a membrane that erases `concept` (ESD objective + latent anchoring).

    Each iteration: pick k in [1, steps); sample x_k by running the model *with the membrane on* from
    noise for k DDIM steps of the prompt at CFG `sample_guidance`; at that level make the membrane's
    output for the prompt match `out(neutral) - g (out(prompt) - out(neutral))` of the model without
    it, and keep its output for `anchors` random anchor embeddings equal to the model's (weight
    `anchor_weight`). `prompts` (default: the bare concept) must each name the concept; their
    neutral is the prompt with the concept replaced by the surrogate.

    With `checkpoint`, state is saved every `every` iterations and a run resumes from it, reaching
    exactly the result of an uninterrupted run. `stop_after` ends early (tests of resuming).
    """
    from diffedit.guidance.cfg import CFG
    from diffedit.sampling import step as ddim_step
    from diffedit.denoiser import prompt_denoiser

    check_concept(concept)
    prompts = list(prompts or [concept])
    for p in prompts:
        if not _concept_pattern(concept).search(p):
            raise UsageError(f"training prompt {p!r} does not name the concept {concept!r}")
    cfg = config
    side = cfg.size or model.default_size()[0]
    device = model.device
    membrane = Membrane.new(model, concept, surrogate, seed=cfg.seed, prompts=[concept])
    membrane.training = {**cfg.to_dict(), "prompts": prompts, "objective": "esd+latent-anchoring"}
    params = [t.to(device).requires_grad_(True) for t in membrane.parameters()]
    names = list(membrane.weights)
    membrane.weights = {n: (params[2 * i], params[2 * i + 1]) for i, n in enumerate(names)}
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    start, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state["config"] != cfg.to_dict() or state["concept"] != concept or state["prompts"] != prompts:
            raise DiffeditError(f"{ckpt}: checkpoint of another training run (concept or parameters differ); "
                                "use --fresh or another --work folder")
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        optim.load_state_dict(state["optim"])
        gen.set_state(state["rng"])
        start, losses = state["step"], state["losses"].tolist()

    network = model.network
    frozen = [p.requires_grad for p in network.parameters()]
    network.requires_grad_(False)
    membranes = attach(model, [membrane], transport="off")
    schedule = model.schedule(cfg.steps, side, side)
    # conditioning, encoded once: each prompt, its neutral, and the unconditional ("") for sampling
    with torch.no_grad():
        enc = {p: model.encode_prompts([p], None, side, side)[0] for p in
               {*prompts, *(_neutral(p, concept, surrogate) for p in prompts)}}
    from diffedit.families import Cond

    samplers = {}  # each prompt's CFG denoiser for sampling x_k, encoded once
    started = time.perf_counter()
    try:
        for it in range(start, cfg.iterations):
            if stop_after is not None and it >= stop_after:
                break
            prompt = prompts[int(torch.randint(len(prompts), (), generator=gen))] if len(prompts) > 1 else prompts[0]
            k = int(torch.randint(1, cfg.steps, (), generator=gen))
            x = torch.randn(model.latent_shape(1, side, side), generator=gen).to(device)
            anchors = sample_anchors(enc[prompt].tensors["text"][0], cfg.anchors, gen) if cfg.anchors else None
            # x_k: k steps of CFG sampling with the membrane on (no gradient)
            denoise = samplers.get(prompt) or samplers.setdefault(
                prompt, prompt_denoiser(model, [prompt], CFG(cfg.sample_guidance), side, side))
            with torch.inference_mode():
                for i in range(k):
                    x0, eps = denoise(x, schedule, i)
                    x = ddim_step(x0, eps, schedule.a[i + 1], schedule.s[i + 1])
            x = x.clone()
            t = schedule.times[k]
            extra = []
            if anchors is not None:  # anchors take the prompt's other tensors (pooled, time ids) as they are
                extra = [Cond({**{kk: v.repeat_interleave(cfg.anchors, 0) for kk, v in enc[prompt].tensors.items()},
                               "text": anchors.to(enc[prompt].tensors["text"].dtype)})]
            neutral = enc[_neutral(prompt, concept, surrogate)]
            with torch.no_grad(), membranes.off():  # the model without the membrane
                cond = Cond.cat([enc[prompt], neutral, *extra])
                out = model.forward(x.repeat(len(cond), 1, 1, 1).to(model.dtype), t, cond).float()
                positive, neutral_out, anchor_off = out[:1], out[1:2], out[2:]
                target = neutral_out - cfg.g * (positive - neutral_out)
            cond = Cond.cat([enc[prompt], *extra])
            out = model.forward(x.repeat(len(cond), 1, 1, 1).to(model.dtype), t, cond).float()
            erase = nn.functional.mse_loss(out[:1], target)
            anchor = nn.functional.mse_loss(out[1:], anchor_off) if cfg.anchors else torch.zeros(())
            loss = erase + cfg.anchor_weight * anchor
            for group in optim.param_groups:
                group["lr"] = cfg.lr * lr_factor(it, cfg)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append([float(erase.detach()), float(anchor.detach())])
            done = it + 1
            if tick is not None:
                tick(done, cfg.iterations, float(loss.detach()))
            if ckpt is not None and (done % every == 0 or done == cfg.iterations):
                _save_checkpoint(ckpt, done, params, optim, gen, losses, cfg, concept, prompts)
    finally:
        membranes.remove()
        for p, flag in zip(network.parameters(), frozen):
            p.requires_grad_(flag)
    membrane.weights = {n: (d.detach().cpu(), u.detach().cpu()) for n, (d, u) in membrane.weights.items()}
    summary = {"iterations": len(losses), "seconds": round(time.perf_counter() - started, 1),
               "erase_loss_first": _mean([e for e, _ in losses[:50]]),
               "erase_loss_last": _mean([e for e, _ in losses[-50:]]),
               "anchor_loss_last": _mean([a for _, a in losses[-50:]])}
    membrane.training["losses"] = summary
    return membrane, {"losses": losses, **summary}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _save_checkpoint(path: Path, step: int, params, optim, gen, losses, cfg, concept, prompts) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": [p.detach().cpu().clone() for p in params], "optim": optim.state_dict(),
             "rng": gen.get_state(), "losses": torch.tensor(losses), "config": cfg.to_dict(), "concept": concept,
             "prompts": prompts}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def erase_loss(model, membrane: Membrane, concept: str, surrogate: str = "", config: TrainConfig = TrainConfig(),
               samples: int = 8, seed: int = 123) -> float:
    """Mean erase objective of `membrane` over `samples` fixed (k, noise) draws (no anchoring term)."""
    from diffedit.families import Cond

    side = config.size or model.default_size()[0]
    gen = torch.Generator("cpu").manual_seed(seed)
    schedule = model.schedule(config.steps, side, side)
    membranes = attach(model, [membrane], transport="off")
    try:
        with torch.inference_mode():
            enc = model.encode_prompts([concept, _neutral(concept, concept, surrogate)], None, side, side)[0]
            total = 0.0
            for _ in range(samples):
                k = int(torch.randint(1, config.steps, (), generator=gen))
                x = torch.randn(model.latent_shape(1, side, side), generator=gen).to(model.device)
                t = schedule.times[k]
                with membranes.off():
                    out = model.forward(x.repeat(2, 1, 1, 1).to(model.dtype), t, enc).float()
                target = out[1:] - config.g * (out[:1] - out[1:])
                mine = model.forward(x.to(model.dtype), t, Cond({kk: v[:1] for kk, v in enc.tensors.items()})).float()
                total += float(nn.functional.mse_loss(mine, target))
    finally:
        membranes.remove()
    return total / samples
