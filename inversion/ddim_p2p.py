"""DDIM inversion + prompt-to-prompt: the baseline Direct Inversion improves on.

The source and target are sampled side by side from the DDIM-inverted noise under prompt-to-prompt
control, without pinning the source to its inversion trajectory.
"""

from dataclasses import dataclass, field

from diffedit.editing.features import PNP_LAYERS, FeatureInjection
from diffedit.editing.p2p import p2p_config, paired_edit
from diffedit.engines import Engine, Params, Run, register
from diffedit.sampling import invert, sample


@dataclass(frozen=True)
class FeatureParams(Params):
    """Plug-and-play feature injection, on the engines with attention control."""

    inject_features: float = 0.0
    feature_layers: list[str] = field(default_factory=lambda: list(PNP_LAYERS))

    def check(self, steps: int) -> None:
        FeatureInjection(self.feature_layers, steps, self.inject_features)


@dataclass(frozen=True)
class P2PParams(FeatureParams):
    """Prompt-to-prompt control (PnP Inversion's defaults), shared with Direct Inversion."""

    cross_replace: float = 0.4
    self_replace: float = 0.6
    cross_replace_edited: float | None = None
    p2p_mode: str = "auto"
    reweight: dict[str, float] = field(default_factory=dict)
    blend: list[str] = field(default_factory=list)
    blend_threshold: float = 0.3

    def check(self, steps: int) -> None:
        super().check(steps)
        p2p_config(self).check()


@register
class DDIMP2P(Engine):
    name = "ddim-p2p"
    exact = False
    Params = P2PParams
    default_steps = 50
    default_guidance = (1.0, 7.5)

    def record_tensors(self, steps, params, latent):
        return {"noise": latent}

    def invert(self, run: Run, z0):
        trajectory = invert(run.source, z0, run.schedule, callback=run.callback)
        return {"noise": trajectory[-1], **run.trajectory_if_masked(trajectory)}

    def edit(self, run: Run, tensors):
        noise = tensors["noise"].to(run.model.device)
        background = run.background(tensors, self.name)
        if run.sources == run.targets:  # no edit: plain DDIM reconstruction
            keep = None if background is None else lambda i, x, x0: run.keep(x, background[i + 1])
            return sample(run.target, noise, run.schedule, callback=run.callback, after_step=keep)
        return paired_edit(run, noise, noise, background=None if background is None else list(background))
