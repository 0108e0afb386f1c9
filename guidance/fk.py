"""Feynman-Kac steering (Singhal et al., 2025): K particles, rewards on x0_hat, resampling.

The particles run the stochastic sampler (churn `eta`, 1 by default) side by side in the batch,
each with its own noise generator (particle k uses seed + k, so K = 1 is exactly the plain
stochastic sampler with that seed). On resampling steps a reward is computed on each particle's
decoded clean estimate, potentials turn rewards into weights, and when the effective sample size
falls below `ess_threshold * K` particles are resampled (systematic) with a generator of their own.
A reward that raises stops the job with its message; a particle whose reward is NaN gets weight 0,
and if every particle does the job fails rather than return an unjudged image.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffedit.errors import DiffeditError, UsageError
from diffedit.sampling import Denoise, sample

Reward = Callable[[torch.Tensor, str], torch.Tensor]  # (images [K,3,H,W] in [0,1], prompt) -> [K]
POTENTIALS = ("diff", "max", "sum")


@dataclass
class FKConfig:
    particles: int = 4
    lam: float = 10.0
    potential: str = "max"
    every: int = 5  # resample every this many steps ...
    start: float = 0.0  # ... within this fraction of the steps
    stop: float = 0.8
    ess_threshold: float = 0.5
    eta: float = 1.0

    def check(self) -> None:
        if self.particles < 1:
            raise UsageError(f"--fk-particles {self.particles} must be at least 1")
        if self.potential not in POTENTIALS:
            raise UsageError(f"--fk-potential {self.potential!r}: use one of {', '.join(POTENTIALS)}")
        if self.every < 1 or not 0 <= self.start <= self.stop <= 1:
            raise UsageError("--fk-every must be >= 1 and 0 <= start <= stop <= 1")
        if not 0 < self.eta <= 1:
            raise UsageError(f"--eta {self.eta} must be in (0, 1]: FK steering needs a stochastic sampler")


def _potential(kind: str, lam: float, rewards: list[torch.Tensor]) -> torch.Tensor:
    """log G_t for each particle from its reward history (latest last)."""
    r = torch.stack(rewards)
    if kind == "diff":
        return lam * (r[-1] - (r[-2] if len(rewards) > 1 else torch.zeros_like(r[-1])))
    if kind == "max":
        return lam * r.max(0).values
    return lam * r.sum(0)


def _systematic(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = len(weights)
    positions = (torch.rand(1, generator=gen) + torch.arange(k)) / k
    return torch.searchsorted(torch.cumsum(weights, 0), positions).clamp(max=k - 1)


def steer(
    denoise: Denoise, schedule, shape: tuple[int, ...], seed: int, reward: Reward, prompt: str,
    decode: Callable[[torch.Tensor], torch.Tensor], config: FKConfig, device: torch.device,
    callback=None, start: torch.Tensor | None = None, refresh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run K particles; returns (all final latents [K,...], final rewards [K], stats).

    Particles start from their own noise, or all from `start` (an inverted latent, for edits).
    `refresh` takes consistency steps (latent-consistency models: all of the next level's noise is
    fresh, whatever the churn).
    """
    config.check()
    k, n = config.particles, len(schedule)
    gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(k)]
    if start is None:
        x = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
    else:
        x = start.to(device, torch.float32).expand(k, *shape[1:]).clone()
    resampler = _Resampler(config, n, reward, decode, prompt, seed)
    draw = lambda i: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)  # noqa: E731
    x = sample(denoise, x, schedule, eta=config.eta, noise=draw, callback=callback, refresh=refresh,
               after_step=resampler if k > 1 else None)
    final = _judge(reward, decode(x), prompt)
    return x, final, {"particles": k, "resamples": resampler.resamples}


class _Resampler:
    """FK's step hook: at the chosen steps, weigh the particles by the potential of their rewards
    and resample them when the effective sample size falls below the threshold."""

    def __init__(self, config: FKConfig, steps: int, reward: Reward, decode, prompt: str, seed: int):
        self.config, self.reward, self.decode, self.prompt = config, reward, decode, prompt
        self.first, self.last = int(config.start * steps), int(config.stop * steps)
        self.gen = torch.Generator("cpu").manual_seed(seed + 1_000_003)  # never touches particle noise
        self.history: list[torch.Tensor] = []
        self.log_g_prev = torch.zeros(config.particles)
        self.resamples = 0

    def __call__(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not (self.first <= i < self.last and (i - self.first) % config.every == config.every - 1):
            return x
        self.history.append(_judge(self.reward, self.decode(x0), self.prompt))
        log_g = _potential(config.potential, config.lam, self.history)
        # incremental weight of this step: G_t over the potential already paid for
        log_w = torch.nan_to_num(log_g - self.log_g_prev, nan=-math.inf)
        if torch.isinf(log_w).all():
            raise DiffeditError(f"FK steering: every particle's reward is NaN at step {i}")
        w = torch.softmax(log_w, 0)
        if 1.0 / float((w * w).sum()) >= config.ess_threshold * config.particles:
            self.log_g_prev = log_g
            return x
        idx = _systematic(w, self.gen)
        self.history = [h[idx] for h in self.history]
        self.log_g_prev = log_g[idx]
        self.resamples += 1
        return x[idx.to(x.device)]


def _judge(reward: Reward, images: torch.Tensor, prompt: str) -> torch.Tensor:
    try:
        values = reward(((images + 1) / 2).clamp(0, 1), prompt)
    except Exception as err:  # a user's reward: report its own words
        raise DiffeditError(f"FK reward failed: {type(err).__name__}: {err}") from None
    values = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    if values.numel() != images.shape[0]:
        raise DiffeditError(f"FK reward returned {values.numel()} values for {images.shape[0]} particles")
    return values


# -- rewards -------------------------------------------------------------------------------------------


def saturation(images: torch.Tensor, prompt: str) -> torch.Tensor:
    """Mean colourfulness (max - min channel), an image statistic usable with any model."""
    return (images.max(1).values - images.min(1).values).mean((1, 2))


def brightness(images: torch.Tensor, prompt: str) -> torch.Tensor:
    return images.mean((1, 2, 3))


BUILTIN_REWARDS: dict[str, Reward] = {"saturation": saturation, "brightness": brightness}


def load_reward(spec: str) -> Reward:
    """A built-in reward name, or `module:function` importable from the current environment."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec == "checker":
        from diffedit.toy.rewards import checker_reward

        return checker_reward
    if ":" not in spec:
        raise UsageError(f"--reward {spec!r}: use {', '.join([*BUILTIN_REWARDS, 'checker'])} or module:function")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"--reward {spec!r}: cannot import ({err})") from None
    if not callable(fn):
        raise UsageError(f"--reward {spec!r} is not callable")
    return fn
