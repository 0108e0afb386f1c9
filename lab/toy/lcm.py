"""Latent consistency distillation (Luo et al. 2023) of the toy model: `diffedit toy distill-lcm`.

The student is the teacher's UNet with a guidance-scale embedding added (`time_cond_proj_dim`, its
projection zero-initialised, so training starts from the teacher). Each step takes a point x_t of
the 50-step DDIM grid (timesteps 19, 39, ..., 999), moves it one grid step with the teacher's DDIM
step under CFG at a random scale w, and pulls the student's clean estimate at x_t towards the
target network's (an EMA of the student) at the teacher's x_{t-20}; at the grid's end the target is
the teacher's own clean estimate. The scale is an input of the student, so one model serves every w.
Saved as a `LatentConsistencyModelPipeline` folder (LCMScheduler) that diffedit samples with
consistency steps.

With `lora_rank` the student is instead the teacher plus LoRA layers (LCM-LoRA, Luo et al. 2023b):
no guidance input (the scale is distilled in), only the LoRA trained, and only the LoRA file saved
(`pytorch_lora_weights.safetensors`, diffusers/PEFT names), to be fused into the teacher
(`--lcm-lora`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffedit import lora
from diffedit.families import guidance_embedding
from lab.testing import SD_SCHEDULE
from lab.toy.train import _checkpoint, _embed, _load, _sd_alphas_cumprod, encode_dataset

GRID = 50  # DDIM steps of the distillation grid (LCMScheduler's original_inference_steps)
# The layers LCM-LoRA adapts: attention projections, feed-forwards, convolutions of the resnets and
# resamplers, the resnets' time projections (not conv_in/conv_out or the time embedding).
LCM_LORA_LAYERS = r"(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv[12]|conv_shortcut|samplers\.0\.conv|time_emb_proj)$"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


@dataclass
class DistillConfig:
    seed: int = 0
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-4
    warmup: int = 100
    target_ema: float = 0.95  # the target network follows the student closely, as in the paper
    w_min: float = 1.0  # CFG scales drawn uniformly from [w_min, w_max]; w = 1 is no guidance
    w_max: float = 8.0
    cond_dim: int = 64  # width of the guidance-scale embedding
    lora_rank: int = 0  # > 0: distil an LCM-LoRA of this rank instead of a whole LCM
    huber_c: float = 1e-3
    dataset: int = 10_000
    checkpoint_every: int = 100


def lora_config(seed: int = 0, steps: int = 1000, rank: int = 16) -> DistillConfig:
    """LCM-LoRA settings: a higher learning rate (LoRA updates move slower than whole weights) and one
    CFG scale, 5 (the toy model's tuned one): the student has no input to tell scales apart."""
    return DistillConfig(seed=seed, steps=steps, lora_rank=rank, lr=5e-4, w_min=5.0, w_max=5.0)


def student_from(teacher: UNet2DConditionModel, cond_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet plus a guidance input whose projection starts at zero (= the teacher)."""
    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": cond_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def _student(teacher: UNet2DConditionModel, config: DistillConfig) -> UNet2DConditionModel:
    if not config.lora_rank:
        return student_from(teacher, config.cond_dim)
    student = copy.deepcopy(teacher)
    lora.attach(student, config.lora_rank, LCM_LORA_LAYERS)
    return student


def _x0(net_eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x - s * net_eps) / a


def distill(teacher_path: str | Path, out: Path, work: Path, config: DistillConfig, tick) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_path), dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    teacher, vae, tokenizer, text_encoder = pipe.unet.eval(), pipe.vae, pipe.tokenizer, pipe.text_encoder
    for module in (teacher, vae, text_encoder):
        module.requires_grad_(False)
    latents, captions = encode_dataset(config, vae, vae.config.scaling_factor, work, tick)
    student = _student(teacher, config)
    target = copy.deepcopy(student).requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup))
    start = 0
    state = _load(work / "lcm.ckpt")
    if state is not None:
        student.load_state_dict(state["student"]), target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    abar = _sd_alphas_cumprod()
    skip = 1000 // GRID
    with torch.no_grad():
        empty = _embed(text_encoder, tokenizer, [""])
    student.train()
    for step in range(start, config.steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 11 * step + 3)
        idx = torch.randint(0, len(captions), (config.batch,), generator=gen)
        z0 = latents[idx]
        n = torch.randint(0, GRID, (config.batch,), generator=gen)
        t, t_prev = skip * n + skip - 1, skip * n - 1  # t_prev = -1: the clean end of the grid
        w = config.w_min + (config.w_max - config.w_min) * torch.rand(config.batch, generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        ab_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones(()))
        a_prev, s_prev = ab_prev.sqrt().view(-1, 1, 1, 1), (1 - ab_prev).sqrt().view(-1, 1, 1, 1)
        x_t = a * z0 + s * eps
        with torch.no_grad():
            text = _embed(text_encoder, tokenizer, [captions[i] for i in idx.tolist()])
            both = teacher(x_t.repeat(2, 1, 1, 1), t.repeat(2),
                           encoder_hidden_states=torch.cat([text, empty.expand_as(text)])).sample
            cond, uncond = both.chunk(2)
            eps_teacher = uncond + w.view(-1, 1, 1, 1) * (cond - uncond)
            x_prev = a_prev * _x0(eps_teacher, x_t, a, s) + s_prev * eps_teacher  # one DDIM step of the teacher
            emb = None if config.lora_rank else guidance_embedding(w - 1, config.cond_dim)
            at_end = (t_prev < 0).view(-1, 1, 1, 1)
            goal = target(x_prev, t_prev.clamp(min=0), encoder_hidden_states=text, timestep_cond=emb).sample
            goal = torch.where(at_end, x_prev, _x0(goal, x_prev, a_prev, s_prev))
        pred = _x0(student(x_t, t, encoder_hidden_states=text, timestep_cond=emb).sample, x_t, a, s)
        loss = ((pred - goal).pow(2) + config.huber_c**2).sqrt().mean() - config.huber_c  # pseudo-Huber
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_target, p in zip(target.parameters(), student.parameters()):
                p_target.lerp_(p, 1 - config.target_ema)
        tick("lcm", step + 1, config.steps, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _checkpoint(work / "lcm.ckpt", student=student.state_dict(), target=target.state_dict(),
                        opt=opt.state_dict(), sched=sched.state_dict(), step=step + 1)
    if config.lora_rank:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.to(torch.float16).contiguous() for k, v in lora.state_dict(target, "unet").items()}
        save_file(weights, str(out / LORA_FILE))
        return {"teacher": str(teacher_path), "config": asdict(config), "lora_layers": len(weights) // 2}
    lcm = LatentConsistencyModelPipeline(
        vae=vae, unet=target.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=LCMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"},
                               original_inference_steps=GRID),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    lcm.to(torch.float16).save_pretrained(out, safe_serialization=True)
    return {"teacher": str(teacher_path), "config": asdict(config)}
