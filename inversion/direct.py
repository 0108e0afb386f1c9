"""Direct Inversion (Ju et al., ICLR 2024, "PnP Inversion") with prompt-to-prompt editing.

DDIM-invert the source (conditional only by default), keeping the whole trajectory. The edit runs
source and target side by side in one batched forward under prompt-to-prompt control; after every
step the source row is put back on the inverted trajectory (the paper adds the difference between
the trajectory and the step's result, which is the same thing), so the attention the target borrows
is that of an exact reconstruction. The paper computes those differences in a separate pass; here
the source row of the edit batch is that pass, so it costs nothing extra.

An edit whose target prompt is the source prompt returns the source branch itself: the inverted
latent, exactly, with no network call.
"""

import torch

from diffedit.editing.p2p import paired_edit
from diffedit.engines import Engine, Run, register
from diffedit.inversion.ddim_p2p import P2PParams
from diffedit.sampling import invert


@register
class DirectInversion(Engine):
    name = "direct"
    exact = True
    Params = P2PParams
    default_steps = 50
    default_guidance = (1.0, 7.5)

    def record_tensors(self, steps, params, latent):
        return {"trajectory": (steps + 1, *latent[1:])}

    def invert(self, run: Run, z0):
        return {"trajectory": torch.stack(invert(run.source, z0, run.schedule, callback=run.callback)[::-1])}

    def edit(self, run: Run, tensors):
        trajectory = tensors["trajectory"].to(run.model.device)  # [levels, images, ...], noisiest first
        if run.sources == run.targets:
            return trajectory[-1].clone()
        path = list(trajectory)
        return paired_edit(run, path[0], path[0], pinned=path, background=path if run.region is not None else None)
