"""RF-Solver and FireFlow: the midpoint step, its order, Flux's attention under our processors, and
the engines on tiny SD3 and Flux."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffedit.editing.attention import AttentionControl, Controller
from diffedit.editing.features import ValueSharing, value_layers
from diffedit.errors import UsageError
from diffedit.jobs import edit_record, invert_image
from diffedit.plan import plan_job, plan_of_record
from diffedit.sampling import Midpoint, Schedule, sample


def flow_schedule(steps: int, shift: float = 3.0) -> Schedule:
    s = [shift * v / (1 + (shift - 1) * v) for v in np.linspace(1, 0, steps + 1)]
    return Schedule(torch.tensor([1000 * v for v in s[:-1]]), tuple(1 - v for v in s), tuple(s), end_time=0.0)


MEAN, STD = 0.5, 0.3


def gaussian_flow(x, schedule, i, **_):
    """The exact denoiser of data ~ N(MEAN, STD^2) under `x = (1 - s) x0 + s eps`: along the flow,
    (x - a MEAN) / sqrt(a^2 STD^2 + s^2) is constant, which gives the velocity in closed form."""
    a, s = schedule.a[i], schedule.s[i]
    r = math.sqrt(a * a * STD * STD + s * s)
    v = -MEAN + (s - a * STD * STD) / r * (x - a * MEAN) / r
    x0 = x - s * v
    return x0, x0 + v


def solve_error(steps: int, solver: str, inverse: bool) -> float:
    """One way, noise -> data or data -> noise, against the exact end point."""
    sched = flow_schedule(steps)
    sched = sched.reversed() if inverse else sched
    start = torch.tensor([1.1, -0.4, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    exact = (start - MEAN) / STD if inverse else MEAN + STD * start
    midpoint = {"euler": None, "midpoint": Midpoint(sched), "fireflow": Midpoint(sched, reuse=True)}[solver]
    return float((sample(gaussian_flow, start, sched, solver=midpoint) - exact).abs().max())


def test_schedule_midpoints_and_reversal():
    sched = flow_schedule(4)
    fine = sched.midpoints()
    assert len(fine) == 8 and fine.s[::2] == sched.s and fine.t[::2] == sched.t
    assert fine.s[1] == pytest.approx((sched.s[0] + sched.s[1]) / 2)
    assert fine.t[7] == pytest.approx(sched.t[3] / 2)  # halfway to the end time 0
    back = sched.reversed()
    assert back.s == sched.s[::-1] and back.t[0] == 0.0 and back.end_time == sched.t[0]
    assert back.climbs and back.midpoints().climbs and not back.reversed().climbs
    with pytest.raises(ValueError):
        Schedule(sched.times, sched.a, sched.s).midpoints()  # no time at the last level


@pytest.mark.parametrize("inverse", [False, True])
def test_the_midpoint_step_is_second_order_and_euler_first(inverse):
    """On a flow whose exact solution is known, doubling the steps divides the error by at least 4 with
    RF-Solver's midpoint step (this flow even gives 8), by about 4 with FireFlow's (its reused start
    velocity leaves a term that fades: rates 1.7-2.3 here) and by 2 with Euler."""
    rates = {}
    for solver in ("midpoint", "fireflow", "euler"):
        errors = [solve_error(n, solver, inverse) for n in (32, 64, 128)]
        rates[solver] = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    assert all(r > 1.9 for r in rates["midpoint"]), rates
    assert all(r > 1.6 for r in rates["fireflow"]), rates
    assert all(abs(r - 1) < 0.2 for r in rates["euler"]), rates


def test_fireflow_evaluates_once_per_step_after_the_first():
    calls = []
    denoise = lambda x, sched, i, **kw: calls.append((i, kw.get("inverse", False))) or gaussian_flow(x, sched, i)  # noqa: E731
    sched = flow_schedule(6)
    sample(denoise, torch.ones(1, 1, 1, 1), sched, solver=Midpoint(sched, reuse=True))
    assert [i for i, _ in calls] == [0, 1, 3, 5, 7, 9, 11]
    calls.clear()
    sample(denoise, torch.ones(1, 1, 1, 1), sched.reversed(), solver=Midpoint(sched.reversed()))
    assert [i for i, _ in calls] == list(range(12)) and all(inverse for _, inverse in calls)  # inverting


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_our_processors_compute_what_diffusers_does(tiny, fam):
    pipe, model = tiny(fam)
    torch.manual_seed(0)
    x = torch.randn(model.latent_shape(2, 32, 32))
    cond, _ = model.encode_prompts(["a red circle", "a blue square"], None, 32, 32)
    t = model.schedule(4, 32, 32).times[1]
    with torch.inference_mode():
        theirs = model.forward(x, t, cond)
        with AttentionControl(model.network, Controller()):
            ours = model.forward(x, t, cond)
    assert (ours - theirs).abs().max() <= 1e-5


def test_value_sharing_copies_the_source_rows_values_in_its_layers_and_steps():
    sharing = ValueSharing(("blocks.1.attn",), end=2)
    q, k, v = (torch.randn(4, 2, 5, 3) for _ in range(3))  # [uncond src, uncond tgt, cond src, cond tgt]
    sharing.begin(1, ("uncond", "cond"))
    call = lambda layer: type("Call", (), {"layer": layer, "step": sharing.step, "branches": sharing.branches})  # noqa: E731
    q2, k2, v2 = sharing.qkv(call("blocks.1.attn"), q, k, v)
    assert torch.equal(q2, q) and torch.equal(k2, k)
    assert torch.equal(v2[1], v[0]) and torch.equal(v2[3], v[2]) and torch.equal(v2[0], v[0])
    assert sharing.qkv(call("blocks.0.attn"), q, k, v)[2] is v  # not a shared layer
    sharing.begin(2, ("uncond", "cond"))
    assert sharing.qkv(call("blocks.1.attn"), q, k, v)[2] is v  # past the shared steps


@pytest.mark.parametrize("fam, first", [("sd3", ["transformer_blocks.1.attn"]), ("flux", ["single_transformer_blocks.0.attn"])])
def test_value_layers_follow_the_papers_blocks(tiny, fam, first):
    network = tiny(fam)[1].network
    assert list(value_layers(network, 0.6)) == first
    assert len(value_layers(network, 0.0)) == (2 if fam == "sd3" else 1)


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_second_order_engines_reconstruct_closer_than_euler_at_equal_nfe(tiny, square, fam):
    _, model = tiny(fam)
    error = {}
    for engine, steps in [("ddim", 16), ("rf-solver", 8), ("fireflow", 15)]:  # 16 network calls each way
        plan = plan_job(model, engine=engine, steps=steps, inversion_guidance_scale=1.0)
        _, result = invert_image(model, square, plan, prompt="a red square")
        assert result["nfe"] == 32
        error[engine] = result["latent_max_abs"]
    assert error["rf-solver"] < error["ddim"] / 4 and error["fireflow"] < error["ddim"] / 4, error


@pytest.mark.parametrize("engine", ["rf-solver", "fireflow"])
def test_value_sharing_runs_a_source_row_for_its_steps_only(tiny, square, engine):
    _, model = tiny("sd3")
    record, _ = invert_image(model, square, plan_job(model, engine=engine, steps=6), prompt="a red square", check=False)
    assert record.meta["engine"]["share_steps"] == (5 if engine == "rf-solver" else 1)
    assert torch.equal(record.tensors["trajectory"][-1:], record.tensors["latent"])
    edits = {}
    for share in (0, 2):
        plan = plan_of_record(model, record.meta, edit=True, params={"share_steps": share, "share_from": 0.0})
        edits[share], result = edit_record(model, record, "a blue square", plan)
        evaluations = 2 * 6 if engine == "rf-solver" else 6 + 1
        paired = 0 if share == 0 else (2 * share if engine == "rf-solver" else share + 1)
        assert result["nfe"] == evaluations  # the source row rides in the same forwards
        assert result["forwards"] == {k: v for k, v in {4: paired, 2: evaluations - paired}.items() if v}
    assert not np.array_equal(np.asarray(edits[0]), np.asarray(edits[2]))


@pytest.mark.parametrize("engine", ["rf-solver", "fireflow"])
def test_midpoint_engines_defaults_and_refusals(tiny, square, engine):
    _, model = tiny("flux")
    record, _ = invert_image(model, square, plan_job(model, engine=engine), check=False)
    assert record.meta["steps"] == (30 if engine == "rf-solver" else 8)
    _, sd1 = tiny("sd1")
    with pytest.raises(UsageError, match="needs a rectified-flow model"):
        invert_image(sd1, square, plan_job(sd1, engine=engine), check=False)
    with pytest.raises(UsageError, match="--share-steps 9"):
        invert_image(model, square, plan_job(model, engine=engine, steps=8, params={"share_steps": 9}), check=False)
