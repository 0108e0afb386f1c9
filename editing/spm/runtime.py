"""SPM at sampling time: membranes attached to a network as hooks, with each batch row's
multiplier set per prompt by facilitated transport (`diffedit.editing.spm` describes both)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from diffedit.editing.spm.format import Membrane, load_membranes, target_layers
from diffedit.errors import DiffeditError, UsageError

TRANSPORTS = ("calibrated", "paper", "off")
KEY = "spm"  # the Cond tensor holding each row's multipliers


# -- attaching: hooks that add the branches ----------------------------------------------------------
class Membranes:
    """Membranes attached to a model's network by forward hooks, removable (bit-identical after).

    Each forward adds `sum_k m[row, k] * (alpha_k / rank) * up_k(down_k(x))` to each target layer's
    output, with `m` the rows' multipliers (see `rows`); without rows every membrane is fully on.
    """

    def __init__(self, model, membranes: list[Membrane], transport: str = "calibrated"):
        if transport not in TRANSPORTS:
            raise UsageError(f"--transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})")
        for m in membranes:
            m.check_fits(model)
        self.model, self.items, self.transport = model, membranes, transport
        self._rows: torch.Tensor | None = None
        self._scaled: dict = {}  # the rows' multipliers by (batch, device, dtype), for the current forward
        self.enabled = True
        self._hooks = []
        self._ft = None
        layers = target_layers(model.network)
        device, dtype = model.device, model.dtype
        self._weights = {}
        for name, layer in layers.items():
            # trainable membranes (float32 parameters on the device) are used as they are
            downs = [m.weights[name][0] for m in membranes]
            ups = [m.weights[name][1] for m in membranes]
            self._weights[name] = (downs, ups)
            self._hooks.append(layer.register_forward_hook(self._hook(name, isinstance(layer, nn.Conv2d))))
        self._scales = [m.alpha / m.rank for m in membranes]
        self._cast = {}  # inference copies in the network's dtype, made once
        if not any(t.requires_grad for m in membranes for t in m.parameters()):
            for name, (downs, ups) in self._weights.items():
                self._cast[name] = (torch.cat(downs).to(device, dtype), torch.cat(ups, dim=1).to(device, dtype))

    def __len__(self) -> int:
        return len(self.items)

    def _hook(self, name: str, conv: bool):
        def hook(module, args, out):
            if not self.enabled:
                return None
            x = args[0]
            if name in self._cast:
                down, up = self._cast[name]
            else:
                downs, ups = self._weights[name]
                down, up = torch.cat(downs).to(x.dtype), torch.cat(ups, dim=1).to(x.dtype)
            scale = self._multipliers(x.shape[0], x.device, x.dtype)  # [B, K]
            if conv:
                h = nn.functional.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                h = h * scale[:, :, None, None]
                return out + nn.functional.conv2d(h, up)
            h = nn.functional.linear(x, down)  # [B, ..., K]
            h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])
            return out + nn.functional.linear(h, up)

        return hook

    def _multipliers(self, batch: int, device, dtype) -> torch.Tensor:
        """[batch, K]: multiplier x alpha / rank of each membrane for each row of this forward."""
        key = (batch, device, dtype)
        cached = self._scaled.get(key)
        if cached is not None:
            return cached
        scales = torch.tensor(self._scales, device=device, dtype=dtype)
        if self._rows is None:
            out = scales.expand(batch, -1)
        else:
            rows = self._rows
            if rows.shape[0] != batch:
                if batch % rows.shape[0]:
                    raise DiffeditError(f"SPM: {rows.shape[0]} multiplier rows for a batch of {batch}")
                rows = rows.repeat_interleave(batch // rows.shape[0], dim=0)
            out = rows.to(device, dtype) * scales
        self._scaled[key] = out  # every layer of this forward reuses it
        return out

    @contextmanager
    def rows(self, multipliers: torch.Tensor | None):
        """Within this block, batch row b uses `multipliers[b, k]` for membrane k (None: all 1)."""
        before = self._rows, self._scaled
        self._rows, self._scaled = multipliers, {}
        try:
            yield
        finally:
            self._rows, self._scaled = before

    @contextmanager
    def off(self):
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, "membranes", None) is self:
            self.model.membranes = None

    # -- facilitated transport -------------------------------------------------------------------
    def multipliers(self, prompts: list[str], text: torch.Tensor | None) -> torch.Tensor:
        """[len(prompts), K]: each membrane's multiplier for each prompt (`text`: their embeddings)."""
        k = len(self.items)
        if self.transport == "off" or not prompts:
            return torch.ones(len(prompts), k)
        ft = self._ft or self._prepare_ft()
        out = torch.zeros(len(prompts), k)
        flat = text.detach().float().flatten(1).cpu() if text is not None else None
        for j, (erased, tokens, embeds, base_cos) in enumerate(ft):
            for i, prompt in enumerate(prompts):
                mine = self._tokens(prompt)
                best = 0.0
                for e_tokens, e_embed, c0 in zip(tokens, embeds, base_cos):
                    overlap = len(mine & e_tokens) / len(e_tokens) if e_tokens else 0.0
                    cos = float(nn.functional.cosine_similarity(flat[i], e_embed, dim=0)) if flat is not None else 0.0
                    if self.transport == "calibrated":
                        cos = min(max((cos - c0) / (1 - c0), 0.0), 1.0) if c0 < 1 else float(cos >= 1)
                    best = max(best, cos, overlap)
                out[i, j] = best
        return out

    def _tokens(self, prompt: str) -> set[int]:
        tok = self.model.pipe.tokenizer if getattr(self.model.pipe, "tokenizer", None) is not None \
            else self.model.pipe.tokenizer_2
        special = set(tok.all_special_ids)
        return set(tok(prompt, truncation=True).input_ids) - special

    def _prepare_ft(self):
        ft = []
        h, w = self.model.default_size()
        with torch.inference_mode():
            empty = self.model.encode_prompts([""], None, h, w)[0].tensors["text"].float().flatten(1).cpu()[0]
            for m in self.items:
                cond = self.model.encode_prompts(m.prompts, None, h, w)[0].tensors["text"].float().flatten(1).cpu()
                base = [float(nn.functional.cosine_similarity(empty, e, dim=0)) for e in cond]
                ft.append((m.prompts, [self._tokens(p) for p in m.prompts], list(cond), base))
        self._ft = ft
        return ft

    def tag(self, cond, prompts: list[str]):
        """The Cond with each row's multipliers added (`Cond.tensors["spm"]`)."""
        if cond is None:
            return None
        mult = self.multipliers(prompts, cond.tensors.get("text"))
        return type(cond)({**cond.tensors, KEY: mult.to(next(iter(cond.tensors.values())).device)})

    def describe(self) -> list[dict]:
        return [{"concept": m.concept, "file": Path(m.name).name if m.name else None, "digest": m.digest}
                for m in self.items]


def attach(model, membranes: list[Membrane], transport: str = "calibrated") -> Membranes | None:
    """Put `membranes` on the model (replacing any attached before); none: just remove the old ones."""
    detach(model)
    if not membranes:
        return None
    model.membranes = Membranes(model, membranes, transport)
    return model.membranes


def detach(model) -> None:
    current = getattr(model, "membranes", None)
    if current is not None:
        current.remove()


def apply_files(model, paths: list[str] | None, transport: str = "calibrated") -> Membranes | None:
    """What `--adapter FILE ...` does: load, check and attach (or clear what an earlier job attached)."""
    if transport not in TRANSPORTS:
        raise UsageError(f"--transport must be one of {', '.join(TRANSPORTS)} (got {transport!r})")
    return attach(model, load_membranes(paths or []), transport)
