"""Training one SPM membrane to erase a concept (the paper's latent-anchoring loss, on our sampler)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffedit.editing.spm.format import Membrane, check_concept
from diffedit.editing.spm.runtime import attach
from diffedit.errors import DiffeditError, UsageError


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


def neutral_prompt(prompt: str, concept: str, surrogate: str) -> str:
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
    from diffedit.denoiser import prompt_denoiser
    from diffedit.guidance.cfg import CFG
    from diffedit.sampling import step as ddim_step

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
               {*prompts, *(neutral_prompt(p, concept, surrogate) for p in prompts)}}
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
            neutral = enc[neutral_prompt(prompt, concept, surrogate)]
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
            enc = model.encode_prompts([concept, neutral_prompt(concept, concept, surrogate)], None, side, side)[0]
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
