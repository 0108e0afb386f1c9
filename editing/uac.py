"""Unified attention control (InfEdit, Xu et al., CVPR 2024) on our attention-control mechanism.

Three images run in one batch per edited image: source, target and a "layout" image sampled with
the source prompt. Per branch chunk the rows are every image's source, then every target, then every
layout (roles SOURCE, TARGET, LAYOUT, one row per image each):

- self-attention, progress p < `self_`: the target attends with the source's queries and keys over
  its own values (the source's layout drives the target), and the layout row is the source;
  p >= `self_`: the target attends on its own and the layout row uses the target's queries over the
  source's keys and values (mutual self-attention: non-rigid changes, source content);
- cross-attention, p < `cross`: the target's maps of tokens aligned with the source come from the
  layout row (prompt-to-prompt refine), new tokens keep their own maps;
- optional local blend: outside where the blend words attend in the target, the target follows the
  layout row.
"""

from __future__ import annotations

from diffedit.editing.attention import Controller
from diffedit.editing.p2p import LocalBlend, grid_maps

SOURCE, TARGET, LAYOUT = 0, 1, 2


class UnifiedAttentionControl(Controller):
    def __init__(self, steps: int, self_: float, cross: float, mapper, alphas, blend: LocalBlend | None):
        super().__init__()
        self.steps, self.self_end, self.cross_end = steps, round(self_ * steps), round(cross * steps)
        self.mapper, self.alphas, self.blend = mapper, alphas, blend  # mapper, alphas: [images, tokens]
        self.images = len(mapper)

    def _role(self, rows: slice, role: int, members: tuple[int, ...] | None = None) -> slice | None:
        """The rows of `role` in a branch chunk (None where the chunk does not hold that role)."""
        if members is not None:  # a partial chunk holds whole roles, in order
            roles = sorted({m // self.images for m in members})
            if role not in roles:
                return None
            role = roles.index(role)
        start = rows.start + role * self.images
        return slice(start, start + self.images)

    def needed_rows(self, step, branch, wanted):
        # A branch may leave out the rows no guidance reads (InfEdit's source and layout uncond rows
        # at source scale 1), but the rows a kept row copies from stay: the layout reads the source
        # (and, from `self_end` on, the target's queries); the target reads the source before `self_end`.
        roles = {r // self.images for r in wanted}
        if LAYOUT in roles:
            roles |= {SOURCE, TARGET}
        elif TARGET in roles and step < self.self_end:
            roles.add(SOURCE)
        return frozenset(r * self.images + i for r in roles for i in range(self.images))

    def qkv(self, call, q, k, v):
        if call.cross or call.joint:
            return q, k, v
        q, k, v = q.clone(), k.clone(), v.clone()
        for branch in call.branches:
            rows, members = call.rows(q.shape[0], branch), call.members(branch)
            src, tgt, lay = (self._role(rows, r, members) for r in (SOURCE, TARGET, LAYOUT))
            if call.step < self.self_end:
                if tgt is not None:
                    q[tgt], k[tgt] = q[src], k[src]
                if lay is not None:
                    q[lay], k[lay], v[lay] = q[src], k[src], v[src]
            elif lay is not None:
                q[lay], k[lay], v[lay] = q[tgt], k[src], v[src]
        return q, k, v

    def wants_maps(self, call):
        return call.cross and not call.joint and "cond" in call.branches and (
            call.step < self.cross_end or self.blend is not None)

    def maps(self, call, probs):
        chunk = probs[call.rows(probs.shape[0], "cond")]
        every = slice(0, chunk.shape[0])
        target, layout = chunk[self._role(every, TARGET)], chunk[self._role(every, LAYOUT)]
        if self.blend is not None:
            self.blend.add(grid_maps(target, self.blend.grid))
        if call.step < self.cross_end:
            for k in range(self.images):  # each image its own alignment (a loop over rows, not forwards)
                mapper, alphas = self.mapper[k].to(probs.device), self.alphas[k].to(probs.device, probs.dtype)
                target[k].copy_(layout[k][..., mapper] * alphas + target[k] * (1 - alphas))
        return probs


def ddcm_step(x0_src_net, eps_src, x0_net, eps_net, z_src, z0, a, s, a_next, s_next, eta, xi):
    """One DDCM update of a branch calibrated by the source's prediction error.

    The source branch's own noise is solved in closed form (`eps_cons`), so its clean estimate is
    exactly z0; another branch's clean estimate is z0 plus how its prediction differs from the
    source's. Returns (next latent, clean estimate).
    """
    eps_cons = (z_src - a * z0) / s
    x0 = z0 + (x0_net - x0_src_net)
    direction = eps_net - eps_src + eps_cons
    sigma = (eta**0.5) * s_next
    keep = max(s_next * s_next - sigma * sigma, 0.0) ** 0.5
    return a_next * x0 + keep * direction + sigma * xi, x0

