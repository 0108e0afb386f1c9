"""Family adapters: everything that differs between SD1/SD2/SDXL/SD3/Flux lives here.

An adapter turns prompts into conditioning (once per job), runs one batched network forward,
encodes/decodes images, and builds the schedule. Engines only ever see latents shaped
[B, C, h, w], the `Schedule` and the `(x0, eps)` pairs of `diffedit.sampling` (docs/design.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from diffedit.errors import DiffeditError, UsageError
from diffedit.sampling import Schedule

# How deterministic sampling and inversion step between levels (docs/design.md, "Solvers"): the
# first-order DDIM/Euler step, or DPM-Solver++ (2M) multistep on diffusion models.
SOLVERS = ("ddim", "dpmpp-2m")


@dataclass
class Cond:
    """Conditioning tensors of a batch of prompts; every tensor has the batch first."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})

    def repeat(self, n: int) -> Cond:
        return Cond({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})


class Family:
    """Base adapter over a diffusers pipeline."""

    name: str
    prediction: str  # "epsilon", "v_prediction" or "flow"
    guidance_embedded = False  # True where the guidance scale is a network input (Flux-dev, LCM UNets)

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.vae_scale = pipe.vae_scale_factor
        self.latent_channels = pipe.vae.config.latent_channels
        # Where the model came from and a hash of it; `load_model` sets both for files and hub ids.
        self.source = "<memory>"
        self.loras: list[dict] = []  # LoRA files fused into the weights ({path, scale, lcm?}), for records
        self._fingerprint: str | None = None
        self.compiled: torch.nn.Module | None = None  # torch.compile of the network, made on request
        self.use_compiled = False
        self.membranes = None  # SPM concept-erasure adapters attached to the network (editing/spm/runtime.py)
        # Settings the model's folder recommends where the papers' defaults fail on it (`diffedit.json`
        # beside model_index.json): {"engines": {name: {option: value}}, "move": {option: value}}.
        self.recommended: dict = {}
        # Latent-consistency models (an LCMScheduler in the folder) sample by consistency steps:
        # x0 from the network, then all-fresh noise to the next level (`sample(refresh=True)`).
        self.consistency = isinstance(pipe.scheduler, LCMScheduler)
        self._own_scheduler = pipe.scheduler

    def use_lcm_grid(self, original_steps: int | None) -> None:
        """Pick an LCM model's timesteps from another distillation grid (kept in the scheduler config,
        so records carry it); None restores the folder's own."""
        if not self.consistency:
            if original_steps is not None:
                raise UsageError(f"{self.source}: --lcm-original-steps applies to latent-consistency models "
                                 f"only; this one has a {type(self.pipe.scheduler).__name__}")
            return
        own = self._own_scheduler
        self.pipe.scheduler = own if original_steps is None else LCMScheduler.from_config(
            own.config, original_inference_steps=original_steps)

    def compile(self) -> None:
        """Compile the network once (slow the first call, faster after); `use_compiled` picks it."""
        if self.compiled is None:
            self.compiled = torch.compile(self.network)
        self.use_compiled = True

    @property
    def _run(self) -> torch.nn.Module:
        """The network's forward: compiled when asked for."""
        return self.compiled if self.use_compiled and self.compiled is not None else self.network

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # a model built in memory: hash its weights once
            self._fingerprint = weights_fingerprint(self.network)
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value

    # -- geometry ------------------------------------------------------------------------
    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.unet if hasattr(self.pipe, "unet") else self.pipe.transformer

    # Where the network runs: the first parameter's device (diffusers' own `.device` walks every module
    # on each call), or with offloading (`models.load_model(offload=...)`) the device the hooks move
    # each module to while it runs, its weights resting on the CPU.
    execution_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this many pixels."""
        return self.vae_scale

    def default_size(self) -> tuple[int, int]:
        side = self.network.config.sample_size * self.vae_scale
        return side, side

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    # -- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, height: int, width: int,
                       embedded_guidance: float = 3.5):
        """(cond, uncond) for a batch of prompts; uncond is None when `negatives` is None.

        `embedded_guidance` is the guidance value of guidance-distilled models (Flux); others ignore it.
        """
        raise NotImplementedError

    # -- network -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, a: float, s: float):
        """Turn the network output at `x = a*x0 + s*eps` into `(x0_hat, eps_hat)` (DESIGN §3)."""
        # fused `torch.add(..., alpha=)` forms: this runs every step on every branch
        if self.prediction == "epsilon":
            return torch.add(x, out, alpha=-s).div_(a), out
        if self.prediction == "v_prediction":
            return torch.add(a * x, out, alpha=-s), torch.add(s * x, out, alpha=a)
        return torch.add(x, out, alpha=-s), torch.add(x, out, alpha=a)  # flow: v = eps - x0, a = 1 - t

    # -- images ------------------------------------------------------------------------------
    @property
    def _vae_shift(self) -> float:
        return self.pipe.vae.config.get("shift_factor") or 0.0

    def _vae_dtype(self) -> torch.dtype:
        vae = self.pipe.vae
        return torch.float32 if vae.config.get("force_upcast") and vae.dtype == torch.float16 else vae.dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> normalised latents (posterior mode), float32; with
        `decoder_inversion` steps, refined until they decode to the pixels (`invert_decoder`)."""
        vae = self.pipe.vae
        dtype = self._vae_dtype()
        with torch.inference_mode(), _vae_in(vae, dtype):
            latent = vae.encode(pixels.to(self.device, dtype)).latent_dist.mode()
        _check_finite(latent, "encoding", dtype)
        latents = (latent.float() - self._vae_shift) * vae.config.scaling_factor
        if self.decoder_inversion:
            latents = self.invert_decoder(latents, pixels, self.decoder_inversion)
        return latents

    # Gradient steps of decoder inversion per encoded image (0: the encoder's latent as it is). The
    # encoder only approximates the decoder's inverse; on the toy VAE its latents decode plain
    # backgrounds up to 16 levels off, 3.5 after 50 steps (samples/toy-sd/v3.md). Set by
    # `--decoder-inversion` or the model folder's diffedit.json (a UNet trained on the encoder's
    # latents may edit worse from refined ones: the toy model does).
    decoder_inversion: int = 0
    folder_decoder_inversion: int = 0  # what the model folder recommends (the default of `decoder_inversion`)
    DECODER_INVERSION_LR = 0.05  # Adam's step, in normalised-latent units (latents of unit scale)

    def invert_decoder(self, latents: torch.Tensor, pixels: torch.Tensor, steps: int) -> torch.Tensor:
        """Latents moved by `steps` Adam steps on the squared error between their decoding (clamped to
        [-1, 1], as `decode` returns it) and `pixels`, each image's error on its own (Hong et al. 2024,
        "On Exact Inversion of DPM-Solvers": gradient-based decoder inversion)."""
        vae = self.pipe.vae
        dtype = self._vae_dtype()
        frozen = [p for p in vae.parameters() if p.requires_grad]
        # callers may hold inference tensors: clones made outside inference mode can carry gradients
        with torch.inference_mode(False), torch.enable_grad(), _vae_in(vae, dtype):
            target = pixels.clone().to(self.device, torch.float32)
            z = latents.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.DECODER_INVERSION_LR)
            try:
                for p in frozen:
                    p.requires_grad_(False)
                for _ in range(steps):
                    raw = (z / vae.config.scaling_factor + self._vae_shift).to(dtype)
                    out = vae.decode(raw).sample.float().clamp(-1, 1)
                    # a sum over images of each one's mean: every image's steps are its own in a batch
                    loss = (out - target).pow(2).flatten(1).mean(1).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        _check_finite(z, "inverting the decoder", dtype)
        return z.detach()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1], float32."""
        vae = self.pipe.vae
        dtype = self._vae_dtype()
        z = latents / vae.config.scaling_factor + self._vae_shift
        with torch.inference_mode(), _vae_in(vae, dtype):
            pixels = vae.decode(z.to(self.device, dtype)).sample
        _check_finite(pixels, "decoding", dtype)
        return pixels.float().clamp(-1, 1)

    # -- schedule ----------------------------------------------------------------------------
    def schedule(self, steps: int, height: int, width: int, solver: str = "ddim") -> Schedule:
        raise NotImplementedError

    def check_solver(self, solver: str) -> None:
        """A UsageError (one line) for a solver this model cannot step with."""
        if solver not in SOLVERS:
            raise UsageError(f"--solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        if solver == "ddim":
            return
        if self.prediction == "flow":
            raise UsageError(f"--solver {solver} applies to diffusion models (SD1/SD2/SDXL); "
                             f"{self.name} is a rectified-flow model: use --solver ddim (Euler)")
        if self.consistency:
            raise UsageError(f"--solver {solver} does not apply to latent-consistency models: "
                             "they sample by consistency steps")


def _check_finite(t: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(t).all():  # fp16 VAEs without force_upcast overflow on some images
        if dtype in (torch.float16, torch.bfloat16):
            raise DiffeditError(f"the VAE overflowed {what} in {dtype} (NaN/Inf); use --dtype fp32")
        raise DiffeditError(f"the VAE gave NaN/Inf {what} in {dtype}: its input or its weights hold NaN/Inf")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's parameter values, for models built in memory (tests)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _vae_in:
    """Run the VAE in a given dtype for one call (SD/SDXL VAEs overflow in fp16)."""

    def __init__(self, vae, dtype):
        self.vae, self.dtype, self.before = vae, dtype, vae.dtype

    def __enter__(self):
        if self.dtype != self.before:
            self.vae.to(self.dtype)

    def __exit__(self, *exc):
        if self.dtype != self.before:
            self.vae.to(self.before)


def _negative_arg(negatives: list[str] | None) -> list[str] | None:
    """diffusers' own default for "no negative prompt" (SDXL encodes it as zeros, others as "")."""
    return None if negatives is None or not any(negatives) else negatives


class UNetFamily(Family):
    """SD1.x / SD2.x (eps or v) on `StableDiffusionPipeline`."""

    def __init__(self, pipe, name: str, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)
        self.name = name
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        # LCM-distilled UNets take the guidance scale as an input (w - 1, embedded), not as CFG.
        self.guidance_embedded = self.network.config.get("time_cond_proj_dim") is not None

    def encode_prompts(self, prompts, negatives, height, width, embedded_guidance=3.5):
        cond, uncond = self.pipe.encode_prompt(
            prompts, self.device, 1, negatives is not None, negative_prompt=_negative_arg(negatives)
        )
        make = lambda text: self._with_guidance(Cond({"text": text}), embedded_guidance)  # noqa: E731
        return make(cond), None if negatives is None else make(uncond)

    def _with_guidance(self, cond: Cond, scale) -> Cond:
        """Add the embedded guidance of LCM UNets (one scale for all rows, or one per row)."""
        if self.guidance_embedded:
            w = torch.as_tensor(scale, dtype=torch.float32).expand(len(cond)) - 1
            cond.tensors["timestep_cond"] = guidance_embedding(w, self.network.config.time_cond_proj_dim).to(
                self.device, cond.tensors["text"].dtype)
        return cond

    def forward(self, x, t, cond):
        return self._run(x, t, encoder_hidden_states=cond.tensors["text"],
                         timestep_cond=cond.tensors.get("timestep_cond"), return_dict=False)[0]

    def schedule(self, steps, height, width, solver="ddim"):
        self.check_solver(solver)
        if solver == "dpmpp-2m":
            return self._dpm_schedule(steps)
        if self.consistency:
            return self._consistency_schedule(steps)
        sched = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        times = sched.timesteps.to(self.device)
        # Each level goes to the next listed timestep, and the last to diffusers' final alpha.
        abar = [float(sched.alphas_cumprod[int(t)]) for t in sched.timesteps]
        abar.append(float(sched.final_alpha_cumprod))
        return Schedule(times, tuple(np.sqrt(abar)), tuple(np.sqrt(1.0 - np.array(abar))))

    def _dpm_schedule(self, steps: int) -> Schedule:
        """DPM-Solver++ (2M) levels (docs/design.md, "Solvers"): those of diffusers'
        DPMSolverMultistepScheduler made from the pipeline's scheduler config, down to s = 0.

        The inversion climbs the same levels from the one of timestep 0 (where diffusers'
        DPMSolverMultistepInverseScheduler starts), evaluating the network at each step's starting
        level and time as that scheduler does; with "linspace" spacing its levels are exactly that
        scheduler's. (With "leading" or "trailing" spacing diffusers' inverse scheduler ends above the
        sampler's first level, so a round trip through the two would start sampling from the wrong
        level; ours ends on it.)
        """
        sched = DPMSolverMultistepScheduler.from_config(
            self.pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
            lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", thresholding=False)
        sched.set_timesteps(steps)
        abar0 = sched.alphas_cumprod[0]
        sigmas = [float(v) for v in sched.sigmas] + [float(((1 - abar0) / abar0) ** 0.5)]  # sigma = s / a
        a = [1.0 / math.sqrt(1.0 + v * v) for v in sigmas]
        s = [v * k for v, k in zip(sigmas, a)]
        times = sched.timesteps.to(self.device)
        # level N of the inversion is timestep 0's; its step from level i + 1 runs at level i + 1's time
        inverse = Schedule(torch.cat([times[1:], times.new_zeros(1)]), tuple(a[:-2]) + (a[-1],),
                           tuple(s[:-2]) + (s[-1],), order=2)
        return Schedule(times, tuple(a[:-1]), tuple(s[:-1]), order=2, inverse=inverse)

    def _consistency_schedule(self, steps: int) -> Schedule:
        """LCMScheduler's timesteps (picked from its distillation grid); the last step lands on x0.

        LCMScheduler also mixes in `c_skip * x` (boundary condition); with its timestep scaling of
        10 that weight is below 1e-5 at every grid timestep (>= 19), so x0 is the network's own.
        """
        sched = LCMScheduler.from_config(self.pipe.scheduler.config)
        try:
            sched.set_timesteps(steps)
        except ValueError as err:
            raise UsageError(f"--steps {steps}: {err}") from None
        abar = [float(sched.alphas_cumprod[int(t)]) for t in sched.timesteps] + [1.0]
        return Schedule(sched.timesteps.to(self.device), tuple(np.sqrt(abar)), tuple(np.sqrt(1.0 - np.array(abar))))


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance values (w * 1000), as LCM UNets were distilled with."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class SDXLFamily(UNetFamily):
    def __init__(self, pipe, max_sequence_length=None):
        super().__init__(pipe, "sdxl", max_sequence_length)

    def encode_prompts(self, prompts, negatives, height, width, embedded_guidance=3.5):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=negatives is not None, negative_prompt=_negative_arg(negatives),
        )
        # (original size, crop top-left, target size), as the SDXL pipeline builds them by default
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=self.device)
        time_ids = time_ids.repeat(len(prompts), 1)
        make = lambda text, pool: self._with_guidance(  # noqa: E731
            Cond({"text": text, "pooled": pool.to(cond.dtype), "time_ids": time_ids}), embedded_guidance)
        return make(cond, pooled), None if negatives is None else make(uncond, uncond_pooled)

    def forward(self, x, t, cond):
        c = cond.tensors
        added = {"text_embeds": c["pooled"], "time_ids": c["time_ids"]}
        return self._run(x, t, encoder_hidden_states=c["text"], added_cond_kwargs=added,
                         timestep_cond=c.get("timestep_cond"), return_dict=False)[0]


class FlowFamily(Family):
    prediction = "flow"

    def _sigmas_and_mu(self, steps: int, height: int, width: int):
        return None, None

    def schedule(self, steps, height, width, solver="ddim"):
        self.check_solver(solver)
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sigmas, mu = self._sigmas_and_mu(steps, height, width)
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:
            sched.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        else:
            sched.set_timesteps(steps, device=self.device, **kwargs)
        sig = [float(v) for v in sched.sigmas]
        return Schedule(sched.timesteps.to(self.device), tuple(1.0 - v for v in sig), tuple(sig),
                        end_time=0.0)  # the network time is 1000 sigma

    def _shift_mu(self, seq_len: int) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        return calculate_shift(
            seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5), c.get("max_shift", 1.15),
        )


class SD3Family(FlowFamily):
    name = "sd3"

    @property
    def multiple(self) -> int:
        return self.vae_scale * self.network.config.patch_size

    def encode_prompts(self, prompts, negatives, height, width, embedded_guidance=3.5):
        kwargs = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=negatives is not None,
            negative_prompt=_negative_arg(negatives), **kwargs,
        )
        make = lambda text, pool: Cond({"text": text, "pooled": pool})
        return make(cond, pooled), None if negatives is None else make(uncond, uncond_pooled)

    def forward(self, x, t, cond):
        c = cond.tensors
        return self._run(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=c["text"],
            pooled_projections=c["pooled"], return_dict=False,
        )[0]

    def _sigmas_and_mu(self, steps, height, width):
        if not self.pipe.scheduler.config.get("use_dynamic_shifting"):
            return None, None
        patch = self.network.config.patch_size
        seq_len = (height // self.vae_scale // patch) * (width // self.vae_scale // patch)
        return None, self._shift_mu(seq_len)


class FluxFamily(FlowFamily):
    """Flux: packed 2x2 latents and, for guidance-distilled models, guidance as an input."""

    name = "flux"

    def __init__(self, pipe, max_sequence_length=None):
        super().__init__(pipe, max_sequence_length)
        self.guidance_embedded = bool(self.network.config.guidance_embeds)

    @property
    def multiple(self) -> int:
        return self.vae_scale * 2

    def default_size(self):
        side = 128 * self.vae_scale  # as FluxPipeline's default_sample_size
        return side, side

    def encode_prompts(self, prompts, negatives, height, width, embedded_guidance=3.5):
        kwargs = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}

        def encode(texts):
            text, pooled, text_ids = self.pipe.encode_prompt(texts, None, device=self.device, **kwargs)
            n = len(texts)
            # The distilled guidance value is an input of the network, so it travels with the text.
            # one value for all prompts, or one per prompt (FlowEdit's source and target)
            guidance = torch.as_tensor(embedded_guidance, dtype=torch.float32, device=self.device).expand(n).clone()
            return Cond({"text": text, "pooled": pooled, "text_ids": text_ids.expand(n, -1, -1),
                         "guidance": guidance})

        return encode(prompts), None if negatives is None else encode(negatives)

    def forward(self, x, t, cond):
        b, ch, h, w = x.shape
        packed = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        c = cond.tensors
        out = self._run(
            hidden_states=packed, timestep=t.expand(b).to(x.dtype) / 1000,
            guidance=c["guidance"] if self.guidance_embedded else None,
            pooled_projections=c["pooled"], encoder_hidden_states=c["text"],
            txt_ids=c["text_ids"][0], img_ids=img_ids, return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)

    def latent_shape(self, batch, height, width):
        return (batch, self.network.config.in_channels // 4, 2 * (height // (self.vae_scale * 2)),
                2 * (width // (self.vae_scale * 2)))

    def _sigmas_and_mu(self, steps, height, width):
        _, _, h, w = self.latent_shape(1, height, width)
        return np.linspace(1.0, 1 / steps, steps), self._shift_mu((h // 2) * (w // 2))


def adapter_for(pipe, family: str, max_sequence_length: int | None = None) -> Family:
    if family in ("sd1", "sd2"):
        return UNetFamily(pipe, family, max_sequence_length)
    classes = {"sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily}
    if family not in classes:
        raise DiffeditError(f"unsupported model family {family!r}")
    return classes[family](pipe, max_sequence_length)
