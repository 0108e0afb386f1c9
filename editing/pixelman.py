"""PixelMan object moves (Jiang et al., AAAI 2025): inversion-free, training-free, 16 steps.

1. Pixel manipulation: the object's pixels are copied (optionally scaled about their box centre) to
   the new place; the manipulated image is encoded once, `z0_man`, beside the source, `z0_src`.
2. Three branches noised with one fresh noise per step from a running clean estimate `x0_out`
   (initially `z0_man`): source `a z0_src + s eps`, anchor `a z0_man + s eps`, target
   `a x0_out + s eps`, all in one batched forward.
3. Attention (our attention-control mechanism): in the up-blocks' self-attention the target takes
   the source's keys and values (the reference code saves the anchor's and then the source's, so the
   source's are the ones injected); in every self-attention, queries of the vacated region may not
   attend to the object's new place nor to `m_sim`, the keys the object's queries attended to at the
   previous step (threshold 0.1 of the normalised map), so the old object cannot leak back.
4. Anchored update: `x0_out = z0_man + (x0(target) - x0(anchor)) * (1 - blur(m_gen))`; the pasted
   object stays as pasted except in the last two steps, where the mask is 1 so its edges harmonise.
5. Direct latent optimisation: on the first 60 % of the steps (all of the first 20 %, then every
   other one; three times per step in the 40-60 % window, the paper's resampling) the target latent
   moves down the gradient of feature energies on two decoder blocks' outputs: edit (the moved
   object's features match the anchor's at the source place), content (everything else matches the
   anchor), contrast and inpaint (the vacated region should not look like the object but like the
   rest). Weights 4, 6, 0.2, 0.8, energy scale 0.5e3, step 0.08 (edit gradient inside the target
   mask, the others outside), as the official code.

The blur kernel (9 at SD's 64-latent resolution) scales with the latent size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from diffedit.editing.attention import AttnCall, Controller
from diffedit.editing.word_mask import unit_range
from diffedit.engines import draw
from diffedit.errors import DiffeditError, UsageError

SOURCE, ANCHOR, TARGET = 0, 1, 2  # roles of the rows of each branch chunk (one row per move in a batch)
BLOCKED = -1.0e4  # the reference's additive mask value, on the m_sim logits (finite: a query with every key blocked stays finite)


@dataclass(frozen=True)
class MoveSpec:
    """A displacement in pixels (or `to`: where the object's box centre goes), a scale about the box
    centre, and whether the object also stays where it was (duplicate)."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    keep_source: bool = False
    to: tuple[float, float] | None = None

    def resized(self, sx: float, sy: float, offset: tuple[float, float] = (0.0, 0.0)) -> MoveSpec:
        """The same move on the image resized by (sx, sy) and then cropped at `offset`."""
        to = None if self.to is None else (self.to[0] * sx - offset[0], self.to[1] * sy - offset[1])
        return replace(self, dx=self.dx * sx, dy=self.dy * sy, to=to)


@dataclass
class EnergyWeights:
    edit: float = 4.0
    content: float = 6.0
    contrast: float = 0.2
    inpaint: float = 0.8
    scale: float = 0.5e3  # the official code's energy_scale 0.5, times 1e3
    step: float = 0.08  # gradient step factor

    @classmethod
    def at_scale(cls, energy_scale: float, weights: tuple[float, ...] = (4.0, 6.0, 0.2, 0.8)) -> EnergyWeights | None:
        """The weights at the user's energy scale (the paper's 0.5, times 1e3 inside); 0: energies off."""
        return cls(*weights, scale=energy_scale * 1e3) if energy_scale else None


# -- geometry ------------------------------------------------------------------------------------------


def box_centre(mask: torch.Tensor) -> tuple[float, float]:
    """Centre (x, y) of the mask's bounding box, in pixel units (pixel (i, j) covers [j, j+1] x [i, i+1])."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return (float(xs.min()) + float(xs.max()) + 1) / 2, (float(ys.min()) + float(ys.max()) + 1) / 2


def warp(x: torch.Tensor, centre: tuple[float, float], move: MoveSpec, unit: float, mode: str = "bilinear") -> torch.Tensor:
    """Move the content of `x` [B, C, h, w] as the object moves: p' = s (p - c) + c + d.

    `centre` and the move are in image pixels; `unit` is pixels per cell of `x`. Places with no source
    (outside the frame) are zero. Integer moves at scale 1 copy cells exactly.
    """
    b, _, h, w = x.shape
    cx, cy = centre[0] / unit, centre[1] / unit
    dx, dy = move.dx / unit, move.dy / unit
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    src_x = (xs - cx - dx) / move.scale + cx  # where each destination cell reads from
    src_y = (ys - cy - dy) / move.scale + cy
    grid = torch.stack(torch.meshgrid(2 * src_y / h - 1, 2 * src_x / w - 1, indexing="ij")[::-1], dim=-1)
    grid = grid.to(x.device, torch.float32).expand(b, h, w, 2)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False).to(x.dtype)


def at(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A pixel mask [H, W] (bool) at a coarser grid: cells mostly covered, or any covered if none is."""
    cover = F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0]
    out = cover > 0.5
    return out if out.any() or not mask.any() else cover > 0


@dataclass
class MoveMasks:
    """Pixel masks of a move: `src` the object, `gen` where it goes, `ipt` the vacated region to
    inpaint, `other` everything else."""

    src: torch.Tensor
    gen: torch.Tensor
    ipt: torch.Tensor
    other: torch.Tensor


def plan_move(mask: torch.Tensor, move: MoveSpec, name: str = "mask") -> tuple[MoveMasks, tuple[float, float], MoveSpec]:
    """Check a move and build its masks (and the move with `to` resolved into a displacement); bad
    moves are refused with the mask file's name."""
    if move.scale <= 0 or not math.isfinite(move.scale):
        raise UsageError(f"--scale {move.scale} must be a positive number")
    if not mask.any():
        raise DiffeditError(f"{name}: the mask is empty (no pixel above half grey)")
    if mask.all():
        raise DiffeditError(f"{name}: the mask covers the whole image; there is no background to move the object on")
    centre = box_centre(mask)
    if move.to is not None:
        move = replace(move, dx=move.to[0] - centre[0], dy=move.to[1] - centre[1], to=None)
    gen = warp(mask[None, None].float(), centre, move, 1.0)[0, 0] > 0.5
    if not gen.any():
        raise DiffeditError(f"{name}: moving by ({move.dx:g}, {move.dy:g}) at scale {move.scale:g} puts the object "
                            "fully outside the frame")
    ipt = torch.zeros_like(mask) if move.keep_source else mask & ~gen
    return MoveMasks(mask, gen, ipt, ~(mask | gen)), centre, move


def manipulate(pixels: torch.Tensor, mask: torch.Tensor, move: MoveSpec, centre) -> torch.Tensor:
    """Copy the object's pixels ([1, 3, H, W] in [-1, 1]) to their new place, blending its edge."""
    alpha = warp(mask[None, None].float(), centre, move, 1.0).clamp(0, 1)
    moved = warp(pixels, centre, move, 1.0)
    return pixels * (1 - alpha) + moved * alpha


class PixelManControl(Controller):
    """Key/value injection, leak-proof self-attention and the `m_sim` map, on rows [source, anchor,
    target] of every branch chunk."""

    def __init__(self, masks: MoveMasks, latent_hw: tuple[int, int]):
        super().__init__()
        self.masks, self.latent_hw = masks, latent_hw
        self.sim: torch.Tensor | None = None  # pixel mask of what the object attended to at the last step
        self._sim: dict[int, tuple] = {}  # per grid size: (sum of maps, layers) during a step
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._on_grid: dict[tuple[str, int], torch.Tensor] = {}  # ipt/gen masks per layer grid, fixed for a move
        self._finest = 0  # token count of the finest up-block self-attention seen
        self.leak_proof = bool(masks.ipt.any())

    def begin(self, step, branches, layout=None):
        super().begin(step, branches, layout)
        self._cache = {}  # the blocked keys change with m_sim, once per step

    def _grid(self, tokens: int) -> tuple[int, int]:
        h, w = self.latent_hw
        gh = round(math.sqrt(tokens * h / w))
        return gh, tokens // gh

    def _mask(self, name: str, tokens: int, device) -> torch.Tensor:
        """The move's `ipt` or `gen` mask on a layer's grid, flattened (computed once per grid)."""
        key = (name, tokens)
        if key not in self._on_grid:
            self._on_grid[key] = at(getattr(self.masks, name), *self._grid(tokens)).reshape(-1).to(device)
        return self._on_grid[key]

    def _blocked(self, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(queries of the vacated region, keys they may not see) on a layer's grid, or None."""
        if tokens not in self._cache:
            queries, keys = self._mask("ipt", tokens, device), self._mask("gen", tokens, device)
            if self.sim is not None:
                keys = keys | at(self.sim, *self._grid(tokens)).reshape(-1).to(device)
            self._cache[tokens] = (queries, keys) if queries.any() and keys.any() else None
        return self._cache[tokens]

    @staticmethod
    def _self(call: AttnCall) -> bool:
        return not call.cross and not call.joint

    def qkv(self, call, q, k, v):
        if not self._self(call) or not call.layer.startswith("up_blocks"):
            return q, k, v
        k, v = k.clone(), v.clone()
        for branch in call.branches:
            rows = call.rows(q.shape[0], branch)
            k[rows.start + TARGET], v[rows.start + TARGET] = k[rows.start + SOURCE], v[rows.start + SOURCE]
        return q, k, v

    def blocks(self, call, q, k):
        if not self._self(call) or not self.leak_proof:
            return []
        blocked = self._blocked(q.shape[2], q.device)
        if blocked is None:
            return []
        rows = torch.tensor([call.rows(q.shape[0], branch).start + TARGET for branch in call.branches], device=q.device)
        return [(rows, *blocked)]

    def out(self, call, out, q, k, v):
        # m_sim: where the object's queries attend in the target's conditional self-attention of the
        # finest up-block layers (found in the first step; coarser layers are skipped after it)
        tokens = q.shape[2]
        if not (self._self(call) and "cond" in call.branches and call.layer.startswith("up_blocks")) \
                or tokens < self._finest:
            return out
        if tokens > self._finest:
            self._finest, self._sim = tokens, {}
        row = call.rows(q.shape[0], "cond").start + TARGET
        gen = self._mask("gen", tokens, q.device)
        logits = (q[row][:, gen].float() @ k[row].float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        blocked = self._blocked(tokens, q.device) if self.leak_proof else None
        if blocked is not None:
            queries, keys = blocked
            logits = logits + BLOCKED * (queries[gen][:, None] & keys[None, :])
        total, layers = self._sim.get(tokens, (0.0, 0))
        self._sim[tokens] = (total + logits.softmax(-1).mean(dim=(0, 1)), layers + 1)
        return out

    def end_step(self) -> None:
        """This step's map at the finest recorded grid (averaged over layers, normalised to [0, 1],
        thresholded at 0.1) becomes the `m_sim` of the next step, as a pixel mask."""
        if not self._sim:
            return
        tokens = max(self._sim)
        total, layers = self._sim[tokens]
        gh, gw = self._grid(tokens)
        sim = (unit_range(total / layers) >= 0.1).reshape(gh, gw).cpu()
        ph, pw = self.masks.gen.shape
        self.sim = sim.repeat_interleave(ph // gh, 0).repeat_interleave(pw // gw, 1)
        self._sim = {}


# -- energy guidance -----------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the last feature block's hook: the rest of the network is not needed."""


def feature_blocks(network) -> list[int]:
    """Decoder blocks whose outputs feed the energies: those at half and at full latent resolution
    (SD1's up_blocks 1 and 2, as the official code)."""
    n = len(network.up_blocks)
    return sorted({max(0, n - 3), max(0, n - 2)})


class FeatureEnergy:
    """The four feature energies of PixelMan and their gradient on the target latents: one move per
    latent row (`moves`: each row's masks, box centre and move), every row's features in one pass.
    The energies of the rows are summed; rows do not mix in the network, so each row's gradient is
    its own move's."""

    def __init__(self, model, cond, moves: list[tuple[MoveMasks, tuple[float, float], MoveSpec]],
                 weights: EnergyWeights, latent_hw: tuple[int, int]):
        self.model, self.cond, self.weights = model, cond, weights
        self.moves = [(centre, move) for _, centre, move in moves]
        self.blocks = feature_blocks(model.network)
        h, w = latent_hw
        self.size = (2 * h, 2 * w)  # energies at twice the latent resolution
        self.unit = moves[0][0].src.shape[0] / self.size[0]  # image pixels per energy cell
        fh, fw = self.size
        self.regions = [tuple(at(m, fh, fw).reshape(-1) for m in (masks.gen, masks.ipt, masks.other))
                        for masks, _, _ in moves]  # (gen, ipt, other) per row
        # where each row's edit gradient applies
        self.edit_region = torch.stack([at(masks.gen, h, w) for masks, _, _ in moves])[:, None].to(torch.float32)
        self.passes = 0  # network forwards for features (with or without gradient)
        self.backwards = 0  # network backwards

    def features(self, z: torch.Tensor, t) -> list[torch.Tensor]:
        """The chosen decoder blocks' outputs at `z`, resized to the energy grid (network stops early)."""
        found: list[torch.Tensor] = []
        last = self.blocks[-1]

        def keep(index):
            def hook(module, args, output):
                found.append(output)
                if index == last:
                    raise _Stop

            return hook

        handles = [self.model.network.up_blocks[i].register_forward_hook(keep(i)) for i in self.blocks]
        membranes = self.model.membranes  # SPM adapters at the prompt's multipliers, as in sampling
        rows = membranes.rows(self.cond.tensors.get("spm")) if membranes is not None else nullcontext()
        try:
            with rows:
                self.model.forward(z.to(self.model.dtype), t, self.cond)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.passes += 1
        return [F.interpolate(f.float(), size=self.size, mode="nearest") for f in found]

    def reference(self, z_anchor: torch.Tensor, t) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The anchors' features, as they are and moved with each row's object."""
        with torch.no_grad():
            feats = self.features(z_anchor, t)
        moved = [torch.cat([warp(f[k : k + 1], centre, move, self.unit, mode="nearest")
                            for k, (centre, move) in enumerate(self.moves)]) for f in feats]
        return feats, moved

    def energies(self, z: torch.Tensor, t, reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(edit energy, content + contrast + inpaint energy) of the target latents `z`, summed over rows."""
        wts = self.weights
        ref, ref_moved = reference
        edit = rest = z.new_zeros(())
        for rows, r_all, rm_all in zip(self.features(z, t), ref, ref_moved):
            for k, (gen, ipt, other) in enumerate(self.regions):
                c, r, rm = (x[k].flatten(1) for x in (rows, r_all, rm_all))  # [channels, cells]
                if gen.any():
                    sim = F.cosine_similarity(c[:, gen], rm[:, gen], dim=0).mean()
                    edit = edit + 0.5 * wts.edit / (1 + 4 * sim)
                if other.any():
                    sim = F.cosine_similarity(c[:, other], r[:, other], dim=0).mean()
                    rest = rest + 0.5 * wts.content / (1 + 4 * sim)
                if ipt.any():
                    same = (F.cosine_similarity(c[:, ipt], r[:, ipt], dim=0) + 1) / 2
                    rest = rest + 0.5 * wts.contrast * same.mean()
                    like_rest = (F.cosine_similarity(c[:, ipt].mean(1), r[:, other].mean(1), dim=0) + 1) / 2
                    rest = rest + wts.inpaint / (1 + 4 * like_rest)
        return edit, rest

    def gradient(self, z: torch.Tensor, t, reference) -> torch.Tensor:
        """The latent step `step * (grad_edit * m + grad_rest * (1 - m))` (a forward and two backwards)."""
        wts = self.weights
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            edit, rest = self.energies(z, t, reference)
            grads = []  # two backward passes, as the official code: each gradient is masked differently
            for e in (edit, rest):
                grads.append(torch.autograd.grad(e * wts.scale, z, retain_graph=True)[0] if e.requires_grad
                             else torch.zeros_like(z))
                self.backwards += e.requires_grad
        m = self.edit_region.to(z.device)
        return wts.step * (grads[0] * m + grads[1] * (1 - m))


# -- sampling ------------------------------------------------------------------------------------------


def guided_step(i: int, steps: int) -> bool:
    """Energy guidance on the first 60 % of the steps: every step of the first 20 %, then every other."""
    return i < int(0.6 * steps) and (i % 2 == 0 or i < int(0.2 * steps))


def repeats(i: int, steps: int) -> int:
    """The paper's resampling: three gradient steps on even steps inside the 40-60 % window."""
    return 3 if int(0.4 * steps) < i < int(0.6 * steps) and i % 2 == 0 else 1


def blur(mask: torch.Tensor, latent_side: int) -> torch.Tensor:
    """Gaussian blur of masks [B, 1, h, w] with the official kernel 9 (at 64 latents), scaled to h."""
    k = max(3, int(round(9 * latent_side / 64)) | 1)
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # torchvision's default for a kernel of size k
    x = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).to(mask.device)
    pad = k // 2
    m = F.pad(mask, (pad, pad, pad, pad), mode="reflect")
    m = F.conv2d(m, g.view(1, 1, 1, k))
    return F.conv2d(m, g.view(1, 1, k, 1))


def move_latents(denoise, energy: FeatureEnergy | None, controls: list[PixelManControl], schedule, z0_src, z0_man,
                 masks: list[MoveMasks], generators: list[torch.Generator], callback=None) -> torch.Tensor:
    """The PixelMan loop over a batch of moves (one latent row each; the denoiser's rows are every
    source, then every anchor, then every target): returns the final clean estimates `x0_out`."""
    n, k = len(schedule), len(masks)
    h, w = z0_src.shape[-2:]
    pasted = torch.stack([at(m.gen, h, w) for m in masks])[:, None].float().to(z0_src.device)
    keep_anchor = 1 - blur(pasted, h)
    x0_out = z0_man
    for i in range(n):
        eps = draw(generators, z0_src)
        a, s, t = schedule.a[i], schedule.s[i], schedule.times[i]
        z, z_src, z_man = (a * x + s * eps for x in (x0_out, z0_src, z0_man))
        if energy is not None and guided_step(i, n):
            reference = energy.reference(z_man, t)
            for _ in range(repeats(i, n)):
                z = z - energy.gradient(z, t, reference)
        with torch.inference_mode():
            x0, _ = denoise(torch.cat([z_src, z_man, z]), schedule, i)
        for control in controls:
            control.end_step()
        delta = (x0[TARGET * k : (TARGET + 1) * k] - x0[ANCHOR * k : (ANCHOR + 1) * k]).clone()
        x0_out = z0_man + delta * (keep_anchor if i < n - 2 else 1.0)
        if callback is not None:
            callback(i, z, x0_out)
    return x0_out
