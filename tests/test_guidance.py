"""Guidance: CFG++ identities, PAG against diffusers' PAG pipelines, attention control hygiene."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

from diffedit.denoiser import prompt_denoiser
from diffedit.editing.attention import AttentionControl, Controller
from diffedit.errors import UsageError
from diffedit.guidance import make_guidance
from diffedit.guidance.cfg import CFG, Guidance
from diffedit.sampling import initial_noise, invert, sample

H = W = 32


def run(model, guidance, steps=6, prompt="a red cat", seed=1):
    denoise = prompt_denoiser(model, [prompt], guidance, H, W)
    x = initial_noise(model.latent_shape(1, H, W), [seed], model.device)
    return sample(denoise, x, model.schedule(steps, H, W)), denoise


class StepwiseCFG(Guidance):
    """CFG whose weight changes per step (keyed by network time)."""

    branches = ("uncond", "cond")

    def __init__(self, weights: dict[float, float]):
        self.weights = weights

    def combine(self, preds, t):
        return CFG(self.weights[t]).combine(preds, t)


@pytest.mark.parametrize("fam", ["sd1", "sd3"])
def test_cfgpp_equals_cfg_with_rescaled_weight(tiny, fam):
    _, model = tiny(fam)
    lam, steps = 0.6, 6
    sched = model.schedule(steps, H, W)
    a, s = sched.a, sched.s
    weights = {sched.t[i]: lam * s[i] / (s[i] - a[i] * s[i + 1] / a[i + 1]) for i in range(steps)}
    ours, _ = run(model, make_guidance("cfgpp", lam), steps)
    reference, _ = run(model, StepwiseCFG(weights), steps)
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_cfgpp_at_zero_is_unconditional(tiny):
    _, model = tiny("sd1")
    ours, _ = run(model, make_guidance("cfgpp", 0.0))
    unconditional, _ = run(model, CFG(1.0), prompt="")  # the negative prompt "" alone
    assert (ours - unconditional).abs().max() <= 1e-5


def test_cfgpp_inversion_swaps_roles(tiny):
    """CFG++ inversion: clean estimate from the unconditional branch, renoising with the guided one."""
    _, model = tiny("sd1")
    lam, steps = 0.5, 4
    sched = model.schedule(steps, H, W)
    z0 = torch.randn(model.latent_shape(1, H, W), generator=torch.Generator().manual_seed(0))
    ours = invert(prompt_denoiser(model, ["a red cat"], make_guidance("cfgpp", lam), H, W), z0, sched)[-1]
    uncond = prompt_denoiser(model, [""], CFG(1.0), H, W)
    cond = prompt_denoiser(model, ["a red cat"], CFG(1.0), H, W)
    x = z0
    for i in reversed(range(steps)):
        x0_u, eps_u = uncond(x, sched, i, level=i + 1)
        _, eps_c = cond(x, sched, i, level=i + 1)
        x = sched.a[i] * x0_u + sched.s[i] * (eps_u + lam * (eps_c - eps_u))
    assert (ours - x).abs().max() <= 1e-4 * x.abs().max()


PAG_PIPELINES = {"sd1": (StableDiffusionPAGPipeline, "mid"), "sdxl": (StableDiffusionXLPAGPipeline, "mid"),
                 "sd3": (StableDiffusion3PAGPipeline, "blocks.1")}


@pytest.mark.parametrize("fam", sorted(PAG_PIPELINES))
@pytest.mark.parametrize("w,pag_scale,adaptive", [(5.0, 3.0, 0.0), (1.0, 2.0, 0.0), (4.0, 3.0, 0.003)])
def test_pag_matches_diffusers(tiny, fam, w, pag_scale, adaptive):
    base, model = tiny(fam)
    cls, layers = PAG_PIPELINES[fam]
    parts = {k: v for k, v in base.components.items() if k in cls.__init__.__code__.co_varnames}
    pipe = cls(**parts, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"max_sequence_length": SEQ[fam]} if fam in SEQ else {}
    expected = pipe("a red cat", num_inference_steps=4, guidance_scale=w, pag_scale=pag_scale,
                    pag_adaptive_scale=adaptive, height=H, width=W, output_type="latent",
                    generator=torch.Generator().manual_seed(1), **kwargs).images
    guidance = make_guidance("pag", w, pag_scale=pag_scale, pag_layers=(layers,), pag_adaptive_scale=adaptive)
    ours, denoise = run(model, guidance, steps=4)
    assert (ours - expected).abs().max() <= 1e-4
    assert denoise.calls == 4  # all three branches in one batched forward per step


def test_pag_scale_zero_is_plain_cfg(tiny):
    _, model = tiny("sd1")
    ours, denoise = run(model, make_guidance("pag", 5.0, pag_scale=0.0))
    cfg, _ = run(model, CFG(5.0))
    assert torch.equal(ours, cfg) and denoise.branches == ("uncond", "cond")


def test_pag_changes_the_result_and_cfgpp_pag_runs(tiny):
    _, model = tiny("sd1")
    cfg, _ = run(model, CFG(5.0))
    pag, _ = run(model, make_guidance("pag", 5.0))
    both, denoise = run(model, make_guidance("cfgpp+pag", 0.5))
    assert (pag - cfg).abs().max() > 1e-3
    assert denoise.branches == ("uncond", "cond", "perturbed") and torch.isfinite(both).all()


@pytest.mark.parametrize("kind,scale,extra,message", [
    ("pag", 5.0, {"pag_layers": ("no_such_layer",)}, "matches no self-attention layer"),
    ("pag", 5.0, {"pag_layers": ("mid[",)}, "not a regular expression"),
    ("pag", 5.0, {"pag_scale": -1.0}, "must be >= 0"),
    ("cfgpp", 1.5, {}, "must be in \\[0, 1\\]"),
    ("cfgxx", 1.0, {}, "unknown guidance"),
])
def test_bad_guidance(tiny, kind, scale, extra, message):
    _, model = tiny("sd1")
    with pytest.raises(UsageError, match=message):
        prompt_denoiser(model, ["a cat"], make_guidance(kind, scale, **extra), H, W)


class Exploding(Controller):
    def out(self, call, out, q, k, v):
        raise RuntimeError("boom")


def test_attention_control_is_removed_even_on_error(tiny):
    pipe, model = tiny("sd1")
    before = dict(pipe.unet.attn_processors)
    reference, _ = run(model, CFG(3.0))
    with pytest.raises(RuntimeError, match="boom"):
        _run_with(model, Exploding())
    assert pipe.unet.attn_processors == before
    again, _ = run(model, CFG(3.0))
    assert torch.equal(again, reference)  # bit-identical afterwards


def _run_with(model, controller, steps=2):
    denoise = prompt_denoiser(model, ["a red cat"], CFG(3.0), H, W)
    denoise.control = AttentionControl(model.network, controller)
    x = initial_noise(model.latent_shape(1, H, W), [1], model.device)
    return sample(denoise, x, model.schedule(steps, H, W))


@pytest.mark.parametrize("fam", ["sdxl", "sd3"])
def test_null_controller_changes_nothing(tiny, fam):
    """Our processors compute what diffusers' own do (UNet and SD3 joint attention)."""
    _, model = tiny(fam)
    plain, _ = run(model, CFG(3.0), steps=3)
    ours = _run_with(model, Controller(), steps=3)
    assert (ours - plain).abs().max() <= 1e-5


def test_cli_takes_cfgpp_at_its_own_scale(cli, tiny_folder, tmp_path):
    """CFG++'s lambda lives in [0, 1]: the CLI accepts it there and refuses CFG-sized scales."""
    args = ("generate", "a red cat", "-m", tiny_folder("sd1"), "-n", "2", "--guidance", "cfgpp", "--seed", "1")
    code, _, err = cli(*args, "-g", "0.5", "-o", tmp_path / "ok.png")
    assert code == 0, err
    code, _, err = cli(*args, "-g", "7.5", "-o", tmp_path / "bad.png")
    assert code != 0 and "CFG++ scale 7.5 must be in [0, 1]" in err and not (tmp_path / "bad.png").exists()
