"""Perturbed-attention guidance (Ahn et al., 2024).

A third branch runs with chosen self-attention layers made the identity (each query attends only to
itself, so the layer returns its values); the guided prediction adds `s (c - p)` to CFG or CFG++.
Layers are chosen by unanchored regular expressions over module names, as diffusers does
(default "mid"). In SD3's joint attention the identity covers the image tokens among themselves
(image queries still see the text), like diffusers' PAG joint processor.
"""

from __future__ import annotations

import re

import torch

from diffedit.editing.attention import AttnCall, Controller, attention_layers
from diffedit.errors import UsageError
from diffedit.guidance.cfg import CFG, Guidance
from diffedit.guidance.cfgpp import CFGpp


def _matches(pattern: str, name: str) -> bool:
    # as diffusers: "blocks.1" must not match "blocks.10"
    tail_p, tail_n = pattern.split(".")[-1], name.split(".")[-1]
    fake = tail_p.isnumeric() and tail_n.isnumeric() and tail_p == tail_n
    return re.search(pattern, name) is not None and not fake


def perturbed_layers(network: torch.nn.Module, patterns: list[str]) -> set[str]:
    """Names of the self-attention layers the patterns select; each pattern must select some."""
    selfattn = {n for n, m in attention_layers(network).items() if not m.is_cross_attention}
    chosen = set()
    for pattern in patterns:
        try:
            hits = {n for n in selfattn if _matches(pattern, n)}
        except re.error as err:
            raise UsageError(f"--pag-layers {pattern!r}: not a regular expression ({err})") from None
        if not hits:
            raise UsageError(f"--pag-layers {pattern!r} matches no self-attention layer of this model")
        chosen |= hits
    return chosen


class IdentitySelfAttention(Controller):
    """Makes the chosen self-attention layers the identity on the rows of the 'perturbed' branch."""

    def __init__(self, layers: set[str]):
        super().__init__()
        self.layers = layers

    def _applies(self, call: AttnCall) -> bool:
        return "perturbed" in call.branches and not call.cross and call.layer in self.layers

    def wants_maps(self, call):
        return call.joint and self._applies(call)

    def maps(self, call, probs):
        rows, n = call.rows(probs.shape[0], "perturbed"), call.image_tokens
        image = probs[rows, :, :n, :n]
        eye = torch.eye(n, dtype=probs.dtype, device=probs.device)
        probs[rows, :, :n, :n] = image * eye  # image queries keep themselves and the text keys
        probs[rows, :, :n] /= probs[rows, :, :n].sum(-1, keepdim=True)
        return probs

    def out(self, call, out, q, k, v):
        if self._applies(call) and not call.joint:
            rows = call.rows(out.shape[0], "perturbed")
            out[rows] = v[rows]
        return out


class PAG(Guidance):
    """`base(u, c) + s_t (c - p)` where base is CFG (scale w) or CFG++ (scale lambda)."""

    name = "pag"

    def __init__(self, base: CFG | CFGpp, scale: float = 3.0, layers: tuple[str, ...] = ("mid",),
                 adaptive_scale: float = 0.0):
        self.base, self.scale, self.layers, self.adaptive = base, float(scale), tuple(layers), float(adaptive_scale)
        self.branches = (*base.branches, "perturbed")
        self.name = "cfgpp+pag" if isinstance(base, CFGpp) else "pag"

    def controller(self, network):
        return IdentitySelfAttention(perturbed_layers(network, list(self.layers)))

    def _scale_at(self, t: float) -> float:
        # diffusers' adaptive PAG: the scale falls linearly as sampling proceeds (t from 1000 to 0)
        return max(0.0, self.scale - self.adaptive * (1000.0 - t)) if self.adaptive else self.scale

    def _add(self, pair, preds, t):
        s = self._scale_at(t)
        (x0_c, eps_c), (x0_p, eps_p) = preds["cond"], preds["perturbed"]
        return pair[0] + s * (x0_c - x0_p), pair[1] + s * (eps_c - eps_p)

    def combine(self, preds, t):
        base = self.base.combine(preds, t)
        if isinstance(self.base, CFGpp):  # denoise with the guided estimate, renoise unconditionally
            return self._add(base, preds, t)[0], base[1]
        return self._add(base, preds, t)

    def combine_inverse(self, preds, t):
        base = self.base.combine_inverse(preds, t)
        if isinstance(self.base, CFGpp):
            return base[0], self._add(base, preds, t)[1]
        return self._add(base, preds, t)

    def describe(self):
        return {"name": self.name, "base": self.base.describe(), "pag_scale": self.scale,
                "pag_layers": list(self.layers), "pag_adaptive_scale": self.adaptive}
