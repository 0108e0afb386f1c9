"""Overhead of our sampling loop: vs the bare network forwards it makes, and vs diffusers' pipeline.

Everything is measured side by side in one process, interleaved, taking medians, because absolute
times on shared CPUs are noisy. Both loops run the same job: prompt encoding, CFG with both
branches in one batched forward, DDIM steps, latents out (the VAE decode is the same for both and
is left out).
"""

from __future__ import annotations

import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffedit.denoiser import branch_denoiser
from diffedit.families import adapter_for
from diffedit.sampling import initial_noise, sample
from lab.testing import SD_SCHEDULE, tiny_pipeline

PROMPT = "a red cat on a house"


def mid_size_sd1(time_cond_proj_dim: int | None = None) -> StableDiffusionPipeline:
    """An SD1-shaped pipeline of about 1/10 of SD1.5's UNet width (random weights); with
    `time_cond_proj_dim`, its UNet takes a guidance input as an LCM's does."""
    torch.manual_seed(0)
    small = tiny_pipeline("sd1")
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256), attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, time_cond_proj_dim=time_cond_proj_dim,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


CLOCK = {"now": time.perf_counter}  # `use_cpu_time` swaps in the process's CPU time


def use_cpu_time() -> None:
    """Time by this process's CPU time on one thread: other jobs on the machine then hardly change
    the ratios (wall time measures them too)."""
    torch.set_num_threads(1)
    CLOCK["now"] = time.process_time


def _timed(fn) -> float:
    start = CLOCK["now"]()
    fn()
    return CLOCK["now"]() - start


def measure(name: str, pipe: StableDiffusionPipeline, size: int, steps: int, repeats: int,
            guidance: float = 7.5) -> dict:
    pipe.set_progress_bar_config(disable=True)
    model = adapter_for(pipe, "sd1")
    latent_shape = model.latent_shape(1, size, size)

    def ours():
        denoise = branch_denoiser(model, PROMPT, guidance, size, size)
        x = initial_noise(latent_shape, [0], model.device)
        sample(denoise, x, model.schedule(steps, size, size))
        return denoise.calls

    def reference():
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
             output_type="latent", generator=torch.Generator().manual_seed(0))

    x2 = torch.randn(2, *latent_shape[1:])
    text = torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True)[::-1])
    t = torch.tensor(500)

    def forward():
        with torch.inference_mode():
            pipe.unet(x2, t, encoder_hidden_states=text, return_dict=False)

    nfe = ours()  # warm-up, and the number of batched forwards a job makes
    reference()
    forward()
    ours_t, ref_t, fwd_t = [], [], []
    for _ in range(repeats):  # interleaved so drifts in machine load hit all three alike
        ours_t.append(_timed(ours))
        ref_t.append(_timed(reference))
        fwd_t.append(_timed(lambda: [forward() for _ in range(nfe)]) / nfe)  # a job's worth of forwards
    ours_s, ref_s, fwd_s = map(statistics.median, (ours_t, ref_t, fwd_t))
    return {
        "model": name,
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
        "size": size,
        "steps": steps,
        "nfe": nfe,
        "forward_ms": round(1000 * fwd_s, 3),
        "ours_s": round(ours_s, 4),
        "diffusers_s": round(ref_s, 4),
        "ours_over_nfe_forward": round(ours_s / (nfe * fwd_s), 3),
        "ours_over_diffusers": round(ours_s / ref_s, 3),
    }


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure("tiny-sd1", tiny_pipeline("sd1"), 32, 20 if quick else 50, repeats)]
    if not quick:
        rows.append(measure("mid-sd1", mid_size_sd1(), 256, 20, repeats))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | UNet params (M) | size | steps | NFE | forward (ms) | ours (s) | diffusers (s) "
            "| ours ÷ (NFE × forward) | ours ÷ diffusers |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['unet_params_M']} | {r['size']}² | {r['steps']} | {r['nfe']} | "
            f"{r['forward_ms']} | {r['ours_s']} | {r['diffusers_s']} | {r['ours_over_nfe_forward']} | "
            f"{r['ours_over_diffusers']} |"
        )
    return "\n".join(lines)
