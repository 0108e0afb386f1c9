"""The math every engine shares: the schedule, the one step and the one loop (docs/design.md, "The math").

`x = a*x0 + s*eps` for every family; a step to level j re-mixes the denoiser's `(x0_hat, eps_hat)`
with the coefficients of j, optionally with fresh noise of churn `eta`. The integrator state stays
float32 whatever precision the network runs in; the coefficients are Python floats, so the loop
never waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x, x0_hat)
Prediction = tuple[torch.Tensor, torch.Tensor]  # (x0_hat, eps_hat)
Denoise = Callable[..., Prediction]  # (x, schedule, i, *, level=None, inverse=False) -> guided prediction


@dataclass(frozen=True)
class Schedule:
    """Noise levels from most noisy (index 0) to the end of sampling (index N); a `reversed` one runs
    from clean to noisy.

    `times[i]` is the network's time input at level i (N entries); `a[i]`, `s[i]` are the
    coefficients of `x_i = a_i * x0 + s_i * eps` (N + 1 entries, Python floats so the loop
    never syncs with the device). `order` 2 makes both loops multistep (DPM-Solver++ 2M, see
    `multistep`); `inverse`, when set, is the schedule `invert` climbs instead (its `times[i]` is the
    network's time for the step from level i + 1 to level i).
    """

    times: torch.Tensor
    a: tuple[float, ...]
    s: tuple[float, ...]
    # the network time at level N, where solvers that evaluate at both ends of a step need it (flows: 0,
    # their time being 1000 s); None where no such time exists (VP schedules end below their grid)
    end_time: float | None = None
    climbs: bool = False  # runs from clean to noisy (`reversed`): guidance combines as when inverting
    t: tuple[float, ...] = field(init=False)  # `times` as Python floats, for guidance schedules
    order: int = 1
    inverse: Schedule | None = None

    def __post_init__(self):
        object.__setattr__(self, "t", tuple(float(v) for v in self.times.cpu()))

    def __len__(self) -> int:
        return len(self.times)

    def _all_times(self) -> list[float]:
        if self.end_time is None:
            raise ValueError("this schedule has no network time at its last level")
        return [*self.t, self.end_time]

    def reversed(self) -> Schedule:
        """The same levels run from clean to noisy: `sample` on it inverts, evaluating the network at
        each step's start as an ODE solver does (not at its destination, as `invert` does)."""
        times = self._all_times()[::-1]
        return Schedule(torch.tensor(times[:-1], dtype=self.times.dtype, device=self.times.device),
                        self.a[::-1], self.s[::-1], end_time=times[-1], climbs=not self.climbs)

    def midpoints(self) -> Schedule:
        """Every step split at its middle: level 2i is level i, level 2i+1 halfway to level i+1, in
        time and in both coefficients. Exact for flows (a = 1 - s, time = 1000 s), the only schedules
        the midpoint solvers run on."""
        times, a, s = self._all_times(), [], []
        for j in range(len(self)):
            a += [self.a[j], (self.a[j] + self.a[j + 1]) / 2]
            s += [self.s[j], (self.s[j] + self.s[j + 1]) / 2]
        mid = [v for j in range(len(self)) for v in (times[j], (times[j] + times[j + 1]) / 2)]
        return Schedule(torch.tensor(mid, dtype=self.times.dtype, device=self.times.device),
                        (*a, self.a[-1]), (*s, self.s[-1]), end_time=self.end_time, climbs=self.climbs)


def churn(a_from: float, s_from: float, a_to: float, s_to: float, eta: float) -> float:
    """Std of the fresh noise a stochastic step adds (DDIM's sigma for VP, its analogue for flows)."""
    if eta == 0.0 or s_to == 0.0:
        return 0.0
    ratio = (a_from * s_to) / (a_to * s_from)
    return eta * s_to * math.sqrt(max(0.0, 1.0 - ratio * ratio))


def step(x0: torch.Tensor, eps: torch.Tensor, a_to: float, s_to: float,
         c: float = 0.0, z: torch.Tensor | None = None) -> torch.Tensor:
    """Move to the level (a_to, s_to); with churn c, part of eps is replaced by fresh noise z."""
    if c == 0.0:
        return torch.add(a_to * x0, eps, alpha=s_to)
    return torch.add(a_to * x0, eps, alpha=math.sqrt(max(s_to * s_to - c * c, 0.0))).add_(z, alpha=c)


def multistep(pred: Prediction, x0_prev: torch.Tensor, schedule: Schedule, prev: int, now: int,
              to: int) -> Prediction:
    """DPM-Solver++ (2M): the prediction at level `now` with its x0 extrapolated linearly in
    log-SNR `lambda = log(a/s)` from the previous step's x0 (made at level `prev`), to the middle
    of the step towards level `to`; `step` with it is the 2M update (docs/design.md, "Solvers").

    `D = x0 + (x0 - x0_prev) * h / (2 h_prev)` with `h = lambda_to - lambda_now`,
    `h_prev = lambda_now - lambda_prev`; eps moves with D so that `x = a D + s eps` still holds.
    """
    a, s = schedule.a, schedule.s
    lam = [math.log(a[k] / s[k]) for k in (prev, now, to)]
    x0, eps = pred
    d = (x0 - x0_prev).mul_((lam[2] - lam[1]) / (2.0 * (lam[1] - lam[0])))
    return x0 + d, torch.add(eps, d, alpha=-a[now] / s[now])


def second_order(schedule: Schedule, x0_prev: torch.Tensor | None, final: bool, s_to: float) -> bool:
    """Whether a multistep schedule takes its 2M step: not on a loop's first step (no earlier x0),
    nor on the schedule's final step when it lands on s = 0 or is short (< 15 steps), as diffusers'
    DPM-Solver++ schedulers do (`lower_order_final`)."""
    return schedule.order == 2 and x0_prev is not None and not (final and (s_to == 0.0 or len(schedule) < 15))


class Midpoint:
    """The explicit midpoint rule for a rectified flow (`x = (1 - s) x0 + s eps`, `dx/ds = eps - x0`),
    one instance per loop: the velocity at the step's start moves `x` half a step, the velocity there
    moves it the whole step. This is RF-Solver's second-order Taylor step (its finite-difference
    derivative folded in). With `reuse`, the start velocity is the previous step's midpoint velocity
    (FireFlow), so each step after the first costs one network evaluation.

    As the `solver` of `sample`, it runs on the schedule it was made for (steps split by
    `Schedule.midpoints`), forward or `reversed` alike.
    """

    def __init__(self, schedule: Schedule, reuse: bool = False):
        self.fine, self.reuse, self.velocity = schedule.midpoints(), reuse, None

    def __call__(self, denoise: Denoise, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        f, j = self.fine, 2 * i
        inverting = {"inverse": True} if f.climbs else {}  # e.g. CFG++ renoises differently when inverting
        if self.velocity is None or not self.reuse:
            x0, eps = denoise(x, f, j, **inverting)
            self.velocity = eps - x0
        v = self.velocity[-len(x):]  # a loop may drop leading rows between steps (a finished source row)
        x0, eps = denoise(x + (f.s[j + 1] - f.s[j]) * v, f, j + 1, **inverting)
        self.velocity = eps - x0
        return torch.add(x, self.velocity, alpha=f.s[j + 2] - f.s[j]), x0


Solver = Callable[[Denoise, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (denoise, x, i) -> (x_next, x0)


@torch.inference_mode()
def sample(
    denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, start: int = 0, end: int | None = None,
    eta: float = 0.0, noise: Callable[[int], torch.Tensor] | None = None, callback: Callback | None = None,
    refresh: bool = False, after_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    solver: Solver | None = None,
) -> torch.Tensor:
    """Denoise `x` from level `start` to level `end` (default: the end of the schedule); `noise(i)`
    gives z at step i.

    `refresh` takes consistency steps (latent-consistency models): all of the next level's noise is
    fresh, `x = a x0 + s z`. `after_step(i, x, x0)` may replace the batch after each step (FK
    steering resamples its particles there). A `solver` (e.g. `Midpoint`) takes each deterministic
    step its own way instead of `step`.
    """
    a, s = schedule.a, schedule.s
    x0_prev = None  # the previous step's x0, for multistep schedules
    for i in range(start, len(schedule) if end is None else end):
        if solver is not None:
            x, x0 = solver(denoise, x, i)
        else:
            pred = denoise(x, schedule, i)
            x0 = pred[0]
            if second_order(schedule, x0_prev, i == len(schedule) - 1, s[i + 1]):
                pred = multistep(pred, x0_prev, schedule, i - 1, i, i + 1)
            x0_prev = x0
            c = s[i + 1] if refresh else churn(a[i], s[i], a[i + 1], s[i + 1], eta)
            x = step(*pred, a[i + 1], s[i + 1], c, noise(i) if c else None)
        if callback is not None:
            callback(i, x, x0)
        if after_step is not None:
            x = after_step(i, x, x0)
    return x


@torch.inference_mode()
def invert(
    denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, end: int = 0,
    callback: Callback | None = None, fixed_point: int = 0,
) -> list[torch.Tensor]:
    """Deterministic inversion from the clean end (level N) up to level `end`.

    Each step evaluates the network at time `times[i]` on the current latents and converts with the
    current level's coefficients. For DDIM that time is the destination's, as diffusers'
    DDIMInverseScheduler does; a schedule with an `inverse` climbs that one instead (DPM-Solver++:
    the current level's time, as DPMSolverMultistepInverseScheduler does). Returns the trajectory
    `[x_N, x_{N-1}, ..., x_end]`.

    With `fixed_point` = K > 0 (first-order schedules) each step's first guess is then refined by K
    updates (`unstep`), each with the network evaluated where `sample` evaluates it, towards the
    latents that `sample`'s step maps onto the level below (docs/design.md, "Fixed-point inversion").
    K + 1 evaluations per step.
    """
    if fixed_point and (schedule.order != 1 or schedule.inverse is not None):
        raise ValueError("fixed-point inversion solves first-order steps on the sampler's own levels")
    schedule = schedule.inverse or schedule
    a, s = schedule.a, schedule.s
    trajectory, x0_prev = [x], None
    for i in reversed(range(end, len(schedule))):
        pred = denoise(x, schedule, i, level=i + 1, inverse=True)
        x0 = pred[0]
        if second_order(schedule, x0_prev, i == 0, s[i]):
            pred = multistep(pred, x0_prev, schedule, i + 2, i + 1, i)
        x_below, x = x, step(*pred, a[i], s[i])
        for _ in range(fixed_point):
            pred = denoise(x, schedule, i)
            x = unstep(x_below, x, pred, schedule, i)
            x0 = pred[0]
        x0_prev = x0
        trajectory.append(x)
        if callback is not None:
            callback(i, x, x0)
    return trajectory


def unstep(x_next: torch.Tensor, x: torch.Tensor, pred: Prediction, schedule: Schedule, i: int) -> torch.Tensor:
    """One fixed-point update of level i's latents `x` so that `sample`'s first-order step i lands on
    `x_next`.

    `pred` is the denoiser's at `x`. Its renoising direction `eps` and the noise
    `g = (x - a_i x0) / s_i` it implies are held; the step `x_next = a_{i+1} x0 + s_{i+1} eps` then
    fixes x0, which is renoised to level i along `g`. The true level is the update's fixed point. (At
    a level of pure noise, a flow's first, the latents are `g` itself and stay the first guess.)
    """
    a, s = schedule.a, schedule.s
    x0, eps = pred
    g = (x - a[i] * x0) / s[i]
    return torch.add((x_next - s[i + 1] * eps).mul_(a[i] / a[i + 1]), g, alpha=s[i])


def initial_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the CPU in float32 from one generator per item, as diffusers does."""
    items = [torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
    return torch.stack(items).to(device)
