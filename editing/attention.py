"""One attention-control mechanism for every edit that touches attention (docs/design.md, "Attention control").

Our processors replace diffusers' on every attention layer while a controller is active, and give
the controller three hooks on each call, knowing the layer, the step and which rows of the batch
belong to which branch (uncond / cond / perturbed / source / target ...):

- `qkv(call, q, k, v)`: replace queries, keys or values (key/value injection, mutual self-attention);
- `maps(call, probs)`: read or edit the attention maps (prompt-to-prompt, recording, joint-PAG);
  maps are only materialised when some controller asks for them on that call;
- `blocks(call, q, k)`: keys some queries of some rows may not see (PixelMan's leak-proof
  self-attention), as masks over queries and keys: no [queries, keys] matrix is ever made, the
  blocked queries are attended again over the keys they may see;
- `out(call, out, q, k, v)`: replace the attention output before the output projection (PAG).

A controller may also name other modules in `feature_layers` (e.g. a ResNet block of the UNet's
decoder): while it is installed, `features(layer, out)` sees and may replace their outputs, knowing
the step and branches from `begin` (plug-and-play feature injection).

Processors are swapped by direct assignment on the modules (not `set_attn_processor`, which walks the
whole network), so a Denoiser can install them around each forward and always restore the
originals, even on error. UNet attention (SD1/SD2/SDXL), SD3's joint attention and Flux's attention
(double- and single-stream; its sequences put the text first, `AttnCall.text_first`) are supported;
other layers keep their own processors and are invisible to controllers. Feature layers are
reached with forward hooks, removed on exit like the processors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from diffedit.errors import UsageError

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (batch row indices, query mask [L], key mask [S])


@dataclass(frozen=True)
class AttnCall:
    layer: str  # module name, e.g. "mid_block.attentions.0.transformer_blocks.0.attn1"
    cross: bool  # queries attend to text tokens only
    image_tokens: int  # joint attention: the first `image_tokens` queries/keys are the image's
    joint: bool
    step: int
    branches: tuple[str, ...]
    text_first: bool = False  # Flux: the text tokens come first (single-stream blocks: `image_tokens` 0, unknown)
    # Prompt rows each branch's chunk holds (None: every prompt, the usual equal chunks); only a
    # controller that accepts partial chunks (`Controller.needed_rows`) sees one.
    layout: tuple[tuple[int, ...] | None, ...] | None = None

    def rows(self, batch: int, branch: str) -> slice:
        """Rows of the batch that hold `branch` (branches are stacked in order, full chunks equal)."""
        i = self.branches.index(branch)
        if self.layout is None or all(r is None for r in self.layout):
            per = batch // len(self.branches)
            return slice(i * per, (i + 1) * per)
        partial = [len(r) for r in self.layout if r is not None]
        full = (batch - sum(partial)) // (len(self.layout) - len(partial))
        sizes = [full if r is None else len(r) for r in self.layout]
        start = sum(sizes[:i])
        return slice(start, start + sizes[i])

    def members(self, branch: str) -> tuple[int, ...] | None:
        """The prompt rows `branch`'s chunk holds, in order (None: all of them)."""
        return None if self.layout is None else self.layout[self.branches.index(branch)]


class Controller:
    """Leaves attention unchanged; subclasses override the hooks they need."""

    feature_layers: tuple[str, ...] = ()  # modules whose outputs `features` sees

    def __init__(self):
        self.step, self.branches, self.layout = 0, ("cond",), None

    def begin(self, step: int, branches: tuple[str, ...], layout=None) -> None:
        """The next forward: its step, its branches and the prompt rows of each (`AttnCall.layout`)."""
        self.step, self.branches, self.layout = step, branches, layout

    def needed_rows(self, step: int, branch: str, wanted: frozenset[int]) -> frozenset[int] | None:
        """The prompt rows `branch` must hold at `step` when the guidance reads only `wanted` of them:
        `wanted` and whatever rows this controller's work reads; None for every row. The default,
        None, is for controllers that index each chunk as full stacks of rows."""
        return None

    def wants_maps(self, call: AttnCall) -> bool:
        return False

    def qkv(self, call: AttnCall, q, k, v):
        return q, k, v

    def maps(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def blocks(self, call: AttnCall, q, k) -> list[Block]:
        """(rows, queries, keys): those rows' queries in the `queries` mask do not see the keys in the
        `keys` mask (as if their logits were -inf); a query whose every key is blocked sees them all."""
        return []

    def out(self, call: AttnCall, out, q, k, v):
        return out

    def features(self, layer: str, out: torch.Tensor) -> torch.Tensor:
        """Output of the module `layer` (one of `feature_layers`), batch rows as in `branches`."""
        return out


def attention_maps(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) as SDPA computes it, in float32 for stable maps."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


def _attend(controller: Controller, call: AttnCall, q, k, v, mask=None):
    q, k, v = controller.qkv(call, q, k, v)
    blocks = [b for b in controller.blocks(call, q, k) if not b[2].all()]
    if controller.wants_maps(call):  # the maps are materialised anyway: block on them
        logits_mask = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], device=q.device) if blocks else None
        for rows, queries, keys in blocks:
            logits_mask[rows, 0] += torch.where(queries[:, None] & keys[None, :], -math.inf, 0.0)
        if mask is not None:
            logits_mask = mask.float() if logits_mask is None else logits_mask + mask.float()
        probs = controller.maps(call, attention_maps(q, k, logits_mask))
        out = (probs @ v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for rows, queries, keys in blocks:  # the blocked queries again, over the keys they may see
            seen = ~keys
            sub = None if mask is None else mask.expand(*q.shape[:3], k.shape[2])[rows][:, :, queries][..., seen]
            part = F.scaled_dot_product_attention(q[rows][:, :, queries], k[rows][:, :, seen], v[rows][:, :, seen],
                                                  attn_mask=sub)
            rows_out = out[rows]
            rows_out[:, :, queries] = part
            out[rows] = rows_out
    return controller.out(call, out, q, k, v)


class _Processor:
    def __init__(self, layer: str, module: Attention, controller: Controller):
        self.layer, self.controller = layer, controller
        self.cross = bool(module.is_cross_attention)

    def call(self, image_tokens: int, joint: bool, text_first: bool = False) -> AttnCall:
        c = self.controller
        return AttnCall(self.layer, self.cross, image_tokens, joint, c.step, c.branches, text_first, c.layout)


class UNetProcessor(_Processor):
    """Same computation as diffusers' AttnProcessor2_0, with the controller's hooks."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, ch, h, w = shape4
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        heads, dim = attn.heads, key.shape[-1] // attn.heads
        split = lambda t: t.view(batch, -1, heads, dim).transpose(1, 2)
        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = _attend(self.controller, self.call(query.shape[2], False), query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, heads * dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointProcessor(_Processor):
    """Same computation as diffusers' JointAttnProcessor2_0 (SD3), with the controller's hooks."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        heads, dim = attn.heads, attn.to_k.out_features // attn.heads
        split = lambda t: t.view(batch, -1, heads, dim).transpose(1, 2)
        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq, ck = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = torch.cat([query, cq], 2), torch.cat([key, ck], 2), torch.cat([value, cv], 2)
        out = _attend(self.controller, self.call(image_tokens, True), query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * dim).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class FluxProcessor(_Processor):
    """Same computation as diffusers' FluxAttnProcessor, with the controller's hooks. Double-stream
    blocks attend over [text, image]; single-stream blocks get that sequence already joined."""

    def __init__(self, layer: str, module: FluxAttention, controller: Controller):
        self.layer, self.controller, self.cross = layer, controller, False

    def __call__(self, attn: FluxAttention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [batch, tokens, heads, dim]
        q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        joined = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        image_tokens = hidden_states.shape[1] if joined else 0
        if joined:
            if attn.fused_projections:
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e = encoder_hidden_states
                cq, ck, cv = attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e)
            q = torch.cat([attn.norm_added_q(heads(cq)), q], 1)
            k = torch.cat([attn.norm_added_k(heads(ck)), k], 1)
            v = torch.cat([heads(cv), v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, tokens, dim], as the hooks expect
        out = _attend(self.controller, self.call(image_tokens, True, text_first=True), q, k, v, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if not joined:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], image_tokens], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def attention_layers(network: torch.nn.Module) -> dict[str, Attention]:
    """Attention modules our processors can drive, by module name."""
    return {name: m for name, m in network.named_modules() if isinstance(m, Attention)}


class AttentionControl:
    """Installs a controller on a network for the duration of a `with` block; restores on exit."""

    def __init__(self, network: torch.nn.Module, controller: Controller):
        self.controller = controller
        self.modules = []
        for name, module in network.named_modules():
            if isinstance(module, FluxAttention):  # not an `Attention`, so no layer list (PAG's) names it
                self.modules.append((module, FluxProcessor(name, module, controller)))
        for name, module in attention_layers(network).items():
            kind = JointProcessor if hasattr(module, "add_q_proj") and module.add_q_proj is not None else UNetProcessor
            if kind is UNetProcessor and getattr(module, "added_kv_proj_dim", None):
                continue  # attention with extra key/value projections is not ours to drive
            self.modules.append((module, kind(name, module, controller)))
        self.feature_modules = []
        for name in controller.feature_layers:
            try:
                self.feature_modules.append((name, network.get_submodule(name)))
            except AttributeError:
                raise UsageError(f"feature layer {name!r} is not a module of this network") from None
        self._saved: list = []
        self._hooks: list = []

    def __enter__(self):
        self._saved = [module.processor for module, _ in self.modules]
        for module, processor in self.modules:
            module.processor = processor
        for name, module in self.feature_modules:
            hook = lambda _module, _args, out, name=name: self.controller.features(name, out)  # noqa: E731
            self._hooks.append(module.register_forward_hook(hook))
        return self.controller

    def __exit__(self, *exc):
        for (module, _), original in zip(self.modules, self._saved):
            module.processor = original
        for handle in self._hooks:
            handle.remove()
        self._saved, self._hooks = [], []


class Chain(Controller):
    """Several controllers on the same calls, applied in order (e.g. PAG with prompt-to-prompt)."""

    def __init__(self, *controllers: Controller):
        super().__init__()
        self.controllers = controllers
        self.feature_layers = tuple(dict.fromkeys(n for c in controllers for n in c.feature_layers))

    def begin(self, step, branches, layout=None):
        super().begin(step, branches, layout)
        for c in self.controllers:
            c.begin(step, branches, layout)

    def needed_rows(self, step, branch, wanted):
        for c in self.controllers:
            wanted = c.needed_rows(step, branch, wanted)
            if wanted is None:
                return None
        return wanted

    def wants_maps(self, call):
        return any(c.wants_maps(call) for c in self.controllers)

    def qkv(self, call, q, k, v):
        for c in self.controllers:
            q, k, v = c.qkv(call, q, k, v)
        return q, k, v

    def maps(self, call, probs):
        for c in self.controllers:
            if c.wants_maps(call):
                probs = c.maps(call, probs)
        return probs

    def blocks(self, call, q, k):
        return [b for c in self.controllers for b in c.blocks(call, q, k)]

    def out(self, call, out, q, k, v):
        for c in self.controllers:
            out = c.out(call, out, q, k, v)
        return out

    def features(self, layer, out):
        for c in self.controllers:
            if layer in c.feature_layers:
                out = c.features(layer, out)
        return out


class PerImage(Chain):
    """One controller per image of a batch whose branch chunks hold their rows role by role (every
    image's first row, then every image's second, ...): each controller sees only its own image's
    rows, laid out as if it ran alone. For controllers whose state is one image's (a move's masks and
    attention history); controllers written for a batch axis do not need it."""

    def __init__(self, controllers: list[Controller]):
        super().__init__(*controllers)  # `begin`, `wants_maps` and the feature layers are a chain's

    def _rows(self, batch: int, image: int, device) -> torch.Tensor:
        images, chunk = len(self.controllers), batch // len(self.branches)
        return torch.tensor([b * chunk + r * images + image for b in range(len(self.branches))
                             for r in range(chunk // images)], device=device)

    def _each(self, batch: int, device):
        return ((c, self._rows(batch, k, device)) for k, c in enumerate(self.controllers))

    def qkv(self, call, q, k, v):
        q, k, v = q.clone(), k.clone(), v.clone()
        for c, rows in self._each(q.shape[0], q.device):
            q[rows], k[rows], v[rows] = c.qkv(call, q[rows], k[rows], v[rows])
        return q, k, v

    def maps(self, call, probs):
        for c, rows in self._each(probs.shape[0], probs.device):
            if c.wants_maps(call):
                probs[rows] = c.maps(call, probs[rows])
        return probs

    def blocks(self, call, q, k):
        return [(rows[own], queries, keys) for c, rows in self._each(q.shape[0], q.device)
                for own, queries, keys in c.blocks(call, q[rows], k[rows])]

    def out(self, call, out, q, k, v):
        out = out.clone()
        for c, rows in self._each(q.shape[0], q.device):
            out[rows] = c.out(call, out[rows], q[rows], k[rows], v[rows])
        return out

    def features(self, layer, out):
        out = out.clone()
        for c, rows in self._each(out.shape[0], out.device):
            if layer in c.feature_layers:
                out[rows] = c.features(layer, out[rows])
        return out
