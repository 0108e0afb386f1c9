"""DDIM inversion + prompt-to-prompt: the baseline Direct Inversion improves on.

The source and target are sampled side by side from the DDIM-inverted noise under prompt-to-prompt
control, without pinning the source to its inversion trajectory.
"""

from diffedit.editing.p2p import P2P_DEFAULTS, paired_edit
from diffedit.engines import Engine, Run, register
from diffedit.sampling import invert, sample


@register
class DDIMP2P(Engine):
    name = "ddim-p2p"
    exact = False
    defaults = dict(P2P_DEFAULTS)
    default_steps = 50
    default_guidance = (1.0, 7.5)

    def invert(self, run: Run, z0):
        return {"noise": invert(run.source, z0, run.schedule, callback=run.callback)[-1]}

    def edit(self, run: Run, tensors):
        noise = tensors["noise"].to(run.model.device)
        if run.prompts[0] == run.prompts[1]:  # no edit: plain DDIM reconstruction
            return sample(run.target, noise, run.schedule, callback=run.callback)
        return paired_edit(run, noise, noise)[1:]
