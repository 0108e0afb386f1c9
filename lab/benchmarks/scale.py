"""What the engines cost at the sizes users run: full-size architectures with random weights, built in
code (nothing downloaded), 1-3 steps per job.

- `sd1`: Stable Diffusion 1.5's UNet (860 M), a CLIP ViT-L-sized text encoder, SD's VAE; 512².
- `sdxl`: SDXL's UNet (2.6 B), CLIP ViT-L and OpenCLIP bigG-sized text encoders, SD's VAE; 1024².
- `sd3`: SD3-medium's transformer at full width (24 heads of 64) cut to 2 of its 24 joint blocks, its
  CLIP encoders, T5-XXL at full width cut to 2 of 24 layers, a 16-channel VAE; 1024².
- `flux`: Flux's transformer at full width (24 heads of 128) cut to 1 of 19 double-stream and 2 of 38
  single-stream blocks, CLIP ViT-L, T5-XXL cut to 2 layers, a 16-channel VAE; 1024².

The text encoders' vocabularies are the tests' in-code word lists (their embedding tables are small;
every layer is full size). Each job runs in a fresh process, because peak memory (RSS on a CPU, the
allocator's peak on a GPU) is a high-water mark: the process builds the model, notes its memory, runs
the job once and reports its time, network forwards and peak. One more process measures the bare
network forward at every batch size the jobs used and the VAE's encode and decode, so that
`seconds ÷ (forwards + VAE)` is each job's overhead (the energy passes of PixelMan, with their
backwards, are counted as forwards: its ratio is above 1 by their extra cost); diffusers runs the same job where it has one
(generate, DDIM inversion, LEDITS++, PAG) on the same weights in the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lab.testing import WORDS, clip_word_tokenizer, t5_word_tokenizer

FAMILY_SIZE = {"sd1": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"
# jobs: ours, and diffusers' where it has the same job (the name after "diffusers-")
UNET_JOBS = ("generate", "diffusers-generate", "ddim", "diffusers-ddim", "ddpm-ef", "ddpm-ef-regenerate",
             "diffusers-ledits", "bdia", "direct", "ddim-p2p", "infedit", "pag", "diffusers-pag", "move")
FLOW_JOBS = ("generate", "diffusers-generate", "ddim", "rf-inversion", "flowedit", "rf-solver", "fireflow")
# Steps per job: one, except where an engine needs more to do its work (BDIA inverts from its third
# step at strength 0.8; PixelMan's energy guidance starts on a second step's schedule)
STEPS = {"bdia": 3, "move": 2}
DEFAULT_STEPS = 1


def _clip(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
                            projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_xxl_cut(tokenizer, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=4096, d_ff=10240, d_kv=64, num_layers=layers, num_heads=64,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def _sd_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                         **extra).eval()


def full_size(family: str):
    """A diffusers pipeline of `family`'s full-size architecture (cut in depth as the module says), random
    weights."""
    from lab.testing import (
        SD_SCHEDULE,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    clip = clip_word_tokenizer(list(WORDS))
    if family == "sd1":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # diffusers' defaults are SD1.5's
        return StableDiffusionPipeline(vae=_sd_vae(), unet=unet, text_encoder=_clip(clip, 768, 12, 12), tokenizer=clip,
                                       scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816).eval()
        return StableDiffusionXLPipeline(vae=_sd_vae(force_upcast=True), unet=unet,
                                         text_encoder=_clip(clip, 768, 12, 12),
                                         text_encoder_2=_clip(clip, 1280, 32, 20, projection=1280, act="gelu"),
                                         tokenizer=clip, tokenizer_2=clip, scheduler=DDIMScheduler(**SD_SCHEDULE))
    t5 = t5_word_tokenizer(list(WORDS))
    vae = _sd_vae(16, shift_factor=0.0609, scaling_factor=1.5305)
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                            caption_projection_dim=1536, pooled_projection_dim=2048,
                                            pos_embed_max_size=192).eval()
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=vae, text_encoder=_clip(clip, 768, 12, 12, projection=768),
                                        tokenizer=clip, text_encoder_2=_clip(clip, 1280, 32, 20, projection=1280,
                                                                             act="gelu"),
                                        tokenizer_2=clip, text_encoder_3=_t5_xxl_cut(t5), tokenizer_3=t5)
    if family == "flux":
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=True,
                                             axes_dims_rope=(16, 56, 56)).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=_clip(clip, 768, 12, 12), tokenizer=clip,
                            text_encoder_2=_t5_xxl_cut(t5), tokenizer_2=t5, transformer=transformer)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_SIZE)}")


# -- one job per process -------------------------------------------------------------------------------


def _peak_mib(device: torch.device) -> float:
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _model(family: str, device: str):
    from diffedit.families import adapter_for
    from diffedit.models import pick_device

    dev = pick_device(device)
    pipe = full_size(family).to(dev)
    pipe.set_progress_bar_config(disable=True)
    model = adapter_for(pipe, family)
    # A model loaded from files is fingerprinted from them cheaply (size and 2 MiB samples); one built in
    # memory would hash every weight (3.4 s of an SD1.5 job on this CPU) when its record is made.
    model.fingerprint = f"random-{family}"
    return pipe, model, dev


def _image(size: int):
    import numpy as np
    from PIL import Image

    a = np.full((size, size, 3), 240, np.uint8)
    a[size // 4 : size // 2, size // 4 : size // 2] = (220, 30, 30)
    return Image.fromarray(a)


def run_job(family: str, job: str, device: str = "auto", size: int | None = None) -> dict:
    """One job on a fresh full-size model at `size`² (default the family's; call in a fresh process for its
    peak memory)."""
    import time

    # every job's imports before the model: peaks then compare the jobs, not what each imported
    import diffusers.pipelines.ledits_pp  # noqa: F401
    import diffusers.pipelines.pag  # noqa: F401

    import diffedit.jobs  # noqa: F401

    pipe, model, dev = _model(family, device)
    size, steps = size or FAMILY_SIZE[family], STEPS.get(job, DEFAULT_STEPS)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resident = _peak_mib(dev) if dev.type == "cuda" else _rss_now_mib()
    start = time.perf_counter()
    with torch.inference_mode():
        nfe, forwards, vae = _JOBS.get(job, _edit)(pipe, model, job, size, steps)
    seconds = time.perf_counter() - start
    return {"family": family, "size": size, "job": job, "steps": steps, "nfe": nfe, "forwards": forwards, "vae": vae,
            "seconds": round(seconds, 3), "resident_mib": round(resident, 1), "peak_mib": round(_peak_mib(dev), 1),
            "memory": "cuda" if dev.type == "cuda" else "rss"}


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _edit(pipe, model, engine, size, steps):
    from diffedit.jobs import edit_image
    from diffedit.plan import plan_job

    target, options = TARGET, {}
    if engine == "ddpm-ef-regenerate":  # LEDITS++'s job: invert at CFG 3.5, regenerate unconditionally
        engine, target = "ddpm-ef", ""
        options = {"params": {"skip": 0}, "inversion_guidance_scale": 3.5, "guidance_scale": 1.0}
    if engine == "rf-solver":  # its 5 value-sharing steps (of 30) do not fit in a short run: all of them share
        options = {"params": {"share_steps": steps}}
    _, result, _ = edit_image(model, _image(size), plan_job(model, engine=engine, steps=steps, **options),
                              source_prompt=SOURCE, target_prompt=target)
    return result["nfe"], result["forwards"], {"encode": 1, "decode": 1}


def _generate(pipe, model, job, size, steps):
    from diffedit.guidance import GuidanceSpec
    from diffedit.jobs import generate_image

    guidance = GuidanceSpec(kind="pag") if job == "pag" else None
    _, result = generate_image(model, SOURCE, seed=0, steps=steps, width=size, height=size, guidance=guidance)
    return result["nfe"], result["forwards"], {"decode": 1}


def _diffusers_generate(pipe, model, job, size, steps):
    calls = _count_calls(model.network)
    kwargs = {"guidance_scale": 7.5} if model.name in ("sd1", "sdxl", "sd3") else {"guidance_scale": 3.5}
    if job == "diffusers-pag":
        from diffusers import StableDiffusionPAGPipeline

        pipe = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
        pipe.set_progress_bar_config(disable=True)
        kwargs["pag_scale"] = 3.0
    pipe(SOURCE, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0),
         **kwargs)  # decoded to an image, as ours
    return calls["n"], dict(calls["rows"]), {"decode": 1}


def _diffusers_ddim(pipe, model, job, size, steps):
    """DDIM inversion with diffusers' DDIMInverseScheduler (source prompt, no guidance), then its pipeline
    samples the edit from the inverted latent (CFG 7.5): the same job as our `ddim` engine."""
    from diffusers import DDIMInverseScheduler

    from diffedit.images import to_tensor

    calls = _count_calls(model.network)
    vae = pipe.vae
    latent = vae.encode(to_tensor(_image(size))).latent_dist.mode() * vae.config.scaling_factor
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    text = pipe.encode_prompt(SOURCE, latent.device, 1, False)[0]
    for t in inverse.timesteps:
        latent = inverse.step(pipe.unet(latent, t, text).sample, t, latent).prev_sample
    pipe(TARGET, num_inference_steps=steps, latents=latent, guidance_scale=7.5)
    return calls["n"], dict(calls["rows"]), {"encode": 1, "decode": 1}


def _diffusers_ledits(pipe, model, job, size, steps):
    from diffusers import DDIMScheduler, LEditsPPPipelineStableDiffusion

    class IntIndexDDIM(DDIMScheduler):  # diffusers' LEDITS++ indexes with a float tensor
        def add_noise(self, original, noise, timesteps):
            return super().add_noise(original, noise, timesteps.long())

    calls = _count_calls(model.network)
    parts = {k: v for k, v in pipe.components.items() if k in LEditsPPPipelineStableDiffusion.__init__.__code__.co_varnames}
    parts["scheduler"] = IntIndexDDIM.from_config(pipe.scheduler.config)
    ledits = LEditsPPPipelineStableDiffusion(**parts)
    ledits.set_progress_bar_config(disable=True)
    ledits.invert(image=_image(size), source_prompt=SOURCE, source_guidance_scale=3.5, num_inversion_steps=steps,
                  skip=0.0, generator=torch.Generator().manual_seed(0))
    ledits()  # regenerated without an editing concept, decoded
    return calls["n"], dict(calls["rows"]), {"encode": 1, "decode": 1}


def _move(pipe, model, job, size, steps):
    import numpy as np
    from PIL import Image

    from diffedit.editing.pixelman import EnergyWeights, MoveSpec
    from diffedit.jobs import move_image

    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 255
    _, result = move_image(model, _image(size), Image.fromarray(mask), MoveSpec(size // 8, size // 8), steps=steps,
                           energy=EnergyWeights.at_scale(0.5))  # the paper's energy guidance
    return result["nfe"], result["forwards"], {"encode": 2, "decode": 1}


def _count_calls(network) -> dict:
    """Counts the network's forwards by batch size (diffusers' pipelines do not report them)."""
    calls = {"n": 0, "rows": {}}

    def hook(module, args, kwargs):
        rows = int((args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0])
        calls["n"] += 1
        calls["rows"][rows] = calls["rows"].get(rows, 0) + 1

    network.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


_JOBS = {"generate": _generate, "pag": _generate, "diffusers-generate": _diffusers_generate,
         "diffusers-pag": _diffusers_generate, "diffusers-ddim": _diffusers_ddim, "diffusers-ledits": _diffusers_ledits,
         "move": _move}


def run_costs(family: str, rows: list[int], device: str = "auto", size: int | None = None) -> dict:
    """The bare network forward at each batch size and the VAE's encode and decode, once each (on a
    CPU a full-size forward takes tens of seconds; the jobs ran each once too)."""
    import time

    from diffedit.images import to_tensor

    pipe, model, dev = _model(family, device)
    size = size or FAMILY_SIZE[family]

    def timed(fn) -> float:
        if dev.type == "cuda":
            fn()  # a GPU's first call pays kernel selection; a job's would too, but it is cheap to leave out
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        pixels = to_tensor(_image(size)).to(dev)
        z = model.encode_image(pixels)
        cost = {"encode": timed(lambda: model.encode_image(pixels)), "decode": timed(lambda: model.decode(z))}
        t = model.schedule(10, size, size).times[3]
        for n in rows:
            text = model.encode_prompts([SOURCE] * n, None, size, size)[0]
            x = torch.randn(model.latent_shape(n, size, size), device=dev)
            cost[f"forward_{n}"] = timed(lambda: model.forward(x.to(model.dtype), t, text))
    return {k: round(v, 4) for k, v in cost.items()}


PROBE = "import json, sys; from lab.benchmarks import scale; print(json.dumps(getattr(scale, sys.argv[1])(*json.loads(sys.argv[2]))))"


def _in_process(function: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, function, json.dumps(args)], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args}: {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout.decode().splitlines()[-1])


def run(family: str = "sd1", jobs: tuple[str, ...] | None = None, device: str = "auto", repeats: int = 1,
        size: int | None = None) -> list[dict]:
    """Every job of `family` at `size`² (default the family's) in its own process (`repeats` rounds over
    all jobs, interleaved; medians of seconds and peak), then the forward and VAE costs; rows with the
    ratios."""
    import statistics

    size = size or FAMILY_SIZE[family]
    jobs = jobs or (UNET_JOBS if family in ("sd1", "sdxl") else FLOW_JOBS)
    if family != "sd1":  # diffusers' PAG pipeline, LEDITS++ and move here are SD1's
        jobs = tuple(j for j in jobs if j not in ("diffusers-pag", "diffusers-ledits", "diffusers-ddim"))
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for job in jobs:  # a job that fails (out of memory, say) is reported; the others go on
            try:
                runs[job].append(_in_process("run_job", family, job, device, size))
            except RuntimeError as err:
                errors[job] = str(err)[-300:]
    done, failed = [], []
    for job, rows in runs.items():
        if job in errors or not rows:
            failed.append({"family": family, "size": size, "job": job, "error": errors.get(job, "")})
            continue
        row = dict(rows[0])
        for key in ("seconds", "peak_mib"):
            row[key] = round(statistics.median(r[key] for r in rows), 3)
        row["runs"] = len(rows)
        done.append(row)
    costs = _in_process("run_costs", family, sorted({int(r) for d in done for r in d["forwards"]}), device, size)
    by_job = {d["job"]: d for d in done}
    generate = by_job.get("generate")
    for d in done:
        compute = sum(calls * costs[f"forward_{rows}"] for rows, calls in d["forwards"].items())
        compute += sum(n * costs[part] for part, n in d["vae"].items())
        d["over_compute"] = round(d["seconds"] / compute, 3)
        d["over_generate_memory"] = round(d["peak_mib"] / generate["peak_mib"], 3) if generate else None
        ours = by_job.get(_OURS.get(d["job"], ""))
        if ours is not None:  # a diffusers row: ours ÷ theirs
            d["ours_over_diffusers_time"] = round(ours["seconds"] / d["seconds"], 3)
            d["ours_over_diffusers_memory"] = round(ours["peak_mib"] / d["peak_mib"], 3)
    return done + failed + [{"family": family, "size": size, "job": "costs", **costs}]


_OURS = {"diffusers-generate": "generate", "diffusers-ddim": "ddim", "diffusers-ledits": "ddpm-ef-regenerate",
         "diffusers-pag": "pag"}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | job | steps | network forwards (rows: calls) | seconds | ÷ (forwards + VAE) | peak memory (MiB) "
             "| ÷ generate's peak | ours ÷ diffusers: time, memory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["job"] == "costs":
            continue
        if "error" in r:
            lines.append(f"| {r['family']} {r['size']}² | {r['job']} | failed: {' '.join(r['error'].split())[-120:]} "
                         "| | | | | | |")
            continue
        forwards = ", ".join(f"{rows}: {calls}" for rows, calls in sorted(r["forwards"].items(), key=lambda kv: int(kv[0])))
        versus = (f"{r['ours_over_diffusers_time']}, {r['ours_over_diffusers_memory']}"
                  if "ours_over_diffusers_time" in r else "")
        lines.append(f"| {r['family']} {r['size']}² | {r['job']} | {r['steps']} | {forwards} | {r['seconds']} "
                     f"| {r['over_compute']} | {r['peak_mib']} ({r['memory']}) | {r['over_generate_memory']} | {versus} |")
    costs = [r for r in rows if r["job"] == "costs"]
    for c in costs:
        parts = ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in c.items() if k not in ("family", "size", "job"))
        lines.append(f"\nCosts measured alone on {c['family']} at {c['size']}²: {parts}.")
    return "\n".join(lines)
