"""InfEdit (Xu et al., CVPR 2024): inversion-free editing with DDCM and unified attention control.

No inversion: the source branch starts from noise and its noise is solved in closed form from the
clean latent at every step, so its clean estimate is the input exactly ("virtual inversion"). The
target (and the layout branch, sampled with the source prompt) are calibrated by the source's
prediction error: their clean estimate is the input plus how their prediction differs from the
source's. With the target prompt equal to the source the output is the input. All three branches,
with classifier-free guidance (source scale for source and layout, target scale for the target),
run in one batched forward per step; unified attention control ties them together.

The paper runs latent-consistency models at 12-15 steps (15 is the default on them; on LCMs the
guidance scales are network inputs, not CFG; on an LCM-LoRA, whose guidance is distilled in, both
default to 1: no CFG); ordinary models need more steps (50).
"""

from dataclasses import dataclass, field

import torch

from diffedit.editing.features import with_features
from diffedit.editing.p2p import LocalBlend, P2PConfig, align, blend_positions, check_length
from diffedit.editing.uac import LAYOUT, SOURCE, TARGET, UnifiedAttentionControl, ddcm_step
from diffedit.engines import Engine, Run, draw, register
from diffedit.errors import UsageError
from diffedit.inversion.ddim_p2p import FeatureParams


@dataclass(frozen=True)
class InfEditParams(FeatureParams):
    cross_replace: float = 0.7
    self_replace: float = 0.3
    eta: float = 1.0
    blend: list[str] = field(default_factory=list)
    blend_threshold: float = 0.6

    def check(self, steps: int) -> None:
        super().check(steps)
        P2PConfig(cross=self.cross_replace, self_=self.self_replace, blend_threshold=self.blend_threshold).check()
        if not 0 < self.eta <= 1:
            raise UsageError(f"--eta {self.eta} must be in (0, 1]")


@register
class InfEdit(Engine):
    name = "infedit"
    exact = True
    Params = InfEditParams
    default_steps = 50
    default_guidance = (1.0, 2.0)  # source and target CFG of the paper's demo

    def model_defaults(self, model):
        if model.consistency:  # the paper's step count on latent-consistency models
            # An LCM-LoRA has its guidance distilled in: CFG on top over-guides (toy LCM-LoRA,
            # ShapesBench: target CFG 2 edits less often and keeps less background than 1).
            return 15, self.default_guidance if model.guidance_embedded else (1.0, 1.0)
        return self.default_steps, self.default_guidance

    def invert(self, run: Run, z0):
        return {}  # nothing to invert: the record's clean latent is all InfEdit needs

    @torch.inference_mode()
    def edit(self, run: Run, tensors):
        if not hasattr(run.model.pipe, "unet"):
            raise UsageError("infedit's attention control needs a UNet model (sd1, sd2, sdxl)")
        p, sched, k = run.params, run.schedule, run.images
        z0 = tensors["latent"].to(run.model.device, torch.float32)
        tokenizer = run.model.pipe.tokenizer
        mappers, alphas, positions = [], [], []
        for source, target in zip(run.sources, run.targets):
            check_length(tokenizer, source, "source")
            check_length(tokenizer, target, "target")
            mapper, alpha, _ = align(tokenizer, source, target, "refine", tokenizer.model_max_length)
            mappers.append(mapper)
            alphas.append(alpha)
            if p.blend:  # the region the target's blend words attend to
                positions.append(blend_positions(tokenizer, source, target, list(p.blend))[1])
        blend = LocalBlend(positions, tuple(z0.shape[-2:]), p.blend_threshold, images=k) if p.blend else None
        control = UnifiedAttentionControl(len(sched), p.self_replace, p.cross_replace, torch.stack(mappers),
                                          torch.stack(alphas), blend)
        w_src, w_tgt = run.scales
        control = with_features(control, p, len(sched), images=k, into=[TARGET])  # the layout rows keep their own
        denoise = run.denoiser_for([*run.sources, *run.targets, *run.sources], control,
                                   scales=[w_src] * k + [w_tgt] * k + [w_src] * k)
        gens = run.generators()
        z = draw(gens, z0).repeat(3, 1, 1, 1)  # source, target, layout all start from the same noise
        a, s = sched.a, sched.s
        x0_target = z0
        for i in range(len(sched)):
            x0, eps = (t.unflatten(0, (3, k)) for t in denoise(z, sched, i))  # [role, image, ...]
            xi = draw(gens, z0)
            z = z.unflatten(0, (3, k))
            rows = [ddcm_step(x0[SOURCE], eps[SOURCE], x0[role], eps[role], z[SOURCE], z0, a[i], s[i], a[i + 1],
                              s[i + 1], p.eta, xi) for role in (SOURCE, TARGET, LAYOUT)]
            z = torch.stack([r[0] for r in rows])
            x0_target = rows[TARGET][1]
            mask = blend.take_mask() if blend is not None else None
            if mask is not None:  # outside where the blend words attend, the target follows the layout
                mask = mask.to(z)
                z[TARGET] = z[LAYOUT] + mask * (z[TARGET] - z[LAYOUT])
            if run.region is not None:  # an edit mask: the source outside it
                z[TARGET] = run.keep(z[TARGET], z[SOURCE])
            z = z.flatten(0, 1)
            if run.callback:
                run.callback(i, z, x0.flatten(0, 1))
        return run.keep(x0_target, z0)  # the paper decodes the target's final clean estimate
