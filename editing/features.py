"""Plug-and-play feature injection (Tumanyan et al., CVPR 2023) on our attention-control mechanism.

Cross- and self-attention maps do not carry all of an image's layout: the UNet's convolutions carry
much of it (on the toy model most of it: its objects move even with every attention map taken from
the source). PnP gives the target the source's spatial features instead: the output of a ResNet
block of the UNet's decoder, for the first fraction of the steps. Here, in every branch chunk
(uncond, cond, ...), the target rows take the source row's output of each named layer.

PnP's layer is the second ResNet of the decoder's second level (`up_blocks.1.resnets.1`: 16x16 on
SD at 512 px); deeper ones (`up_blocks.0`) change little, shallower ones copy texture as well.
"""

from __future__ import annotations

from diffedit.editing.attention import Chain, Controller
from diffedit.errors import UsageError

PNP_LAYERS = ("up_blocks.1.resnets.1",)


class FeatureInjection(Controller):
    """For steps < `fraction * steps`, in each branch chunk the rows of the roles `into` take the
    features of the source role's rows (role 0), image by image; a chunk holds `images` rows per role,
    role by role."""

    def __init__(self, layers, steps: int, fraction: float, images: int = 1, into: list[int] | None = None):
        super().__init__()
        if not 0 <= fraction <= 1:
            raise UsageError(f"--inject-features {fraction} must be in [0, 1]")
        if not layers:
            raise UsageError("--feature-layers: name at least one module, e.g. up_blocks.1.resnets.1")
        self.feature_layers = tuple(layers)
        self.end, self.images, self.into = round(fraction * steps), images, into

    def features(self, layer, out):
        if self.step >= self.end:
            return out
        chunks = out.clone().unflatten(0, (len(self.branches), -1, self.images))  # [branch, role, image, ...]
        into = self.into or list(range(1, chunks.shape[1]))
        chunks[:, into] = chunks[:, :1].clone()
        return chunks.flatten(0, 2)


def with_features(controller: Controller, params, steps: int, images: int = 1,
                  into: list[int] | None = None) -> Controller:
    """`controller`, chained with the feature injection `params` ask for (their `inject_features`
    fraction and `feature_layers`; none at fraction 0)."""
    fraction, layers = params.inject_features, params.feature_layers
    injection = FeatureInjection(layers, steps, fraction, images, into)  # checks the options even when off
    return controller if fraction == 0 else Chain(controller, injection)


def value_layers(network, share_from: float) -> tuple[str, ...]:
    """The attention layers whose values RF-Solver and FireFlow share: Flux's single-stream blocks (or
    SD3's joint blocks) from the fraction `share_from` of their depth on (RF-Solver on Flux: 20 of 38)."""
    for prefix in ("single_transformer_blocks", "transformer_blocks"):
        blocks = getattr(network, prefix, None)
        if blocks:
            first = min(round(share_from * len(blocks)), len(blocks) - 1)
            return tuple(f"{prefix}.{i}.attn" for i in range(first, len(blocks)))
    raise UsageError("value sharing needs a transformer's attention blocks (sd3, flux)")


class ValueSharing(Controller):
    """In `layers`, for the denoiser's steps before `end`, the target rows of each branch chunk (the
    second half: sources first, one row per image) take their source rows' attention values (all
    tokens, as RF-Solver and FireFlow do): the sources run on the inversion path beside them, so
    their values are those the inversion computed."""

    def __init__(self, layers: tuple[str, ...], end: int):
        super().__init__()
        self.layers, self.end = set(layers), end

    def qkv(self, call, q, k, v):
        if call.step >= self.end or call.layer not in self.layers:
            return q, k, v
        chunks = v.unflatten(0, (len(call.branches), 2, -1))  # [branch, source/target, image, heads, tokens, dim]
        return q, k, chunks[:, :1].expand_as(chunks).flatten(0, 2)
