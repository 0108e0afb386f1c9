"""Guidance modules: classifier-free guidance and what builds on it."""

from __future__ import annotations

from diffedit.errors import UsageError

KINDS = ("cfg", "cfgpp", "pag", "cfgpp+pag")
CFGPP_DEFAULT = 0.6  # CFG++'s lambda where a CFG scale above 1 was the default (its paper's text-to-image setting)


def make_guidance(kind: str, scale: float, *, pag_scale: float = 3.0, pag_layers: tuple[str, ...] = ("mid",),
                  pag_adaptive_scale: float = 0.0, adaptive_threshold: float | None = None):
    """`kind` with guidance scale `scale` (CFG's w, or CFG++'s lambda in [0, 1]); a list of scales
    gives each prompt of the batch its own (engines that sample a source and a target together)."""
    return GuidanceSpec(kind, pag_scale, pag_layers, pag_adaptive_scale, adaptive_threshold).build(scale)


class GuidanceSpec:
    """The user's choice of guidance, checked when made, applied at whatever scale each branch of a
    job uses: `diffedit.denoiser.prompt_denoiser_for` is the one place that builds it."""

    def __init__(self, kind: str = "cfg", pag_scale: float = 3.0, pag_layers: tuple[str, ...] = ("mid",),
                 pag_adaptive_scale: float = 0.0, adaptive_threshold: float | None = None):
        if kind not in KINDS:
            raise UsageError(f"unknown guidance {kind!r}; use one of {', '.join(KINDS)}")
        if "pag" in kind and (pag_scale < 0 or pag_adaptive_scale < 0):
            raise UsageError(f"--pag-scale ({pag_scale}) and --pag-adaptive-scale ({pag_adaptive_scale}) must be >= 0")
        if adaptive_threshold is not None and kind != "cfg":
            raise UsageError(f"--adaptive-guidance works with --guidance cfg, not {kind}")
        if adaptive_threshold is not None and not 0 < adaptive_threshold <= 1:
            raise UsageError(f"--adaptive-guidance {adaptive_threshold} must be a cosine similarity in (0, 1]")
        self.kind, self.pag_scale = kind, float(pag_scale)
        self.pag_layers, self.pag_adaptive_scale = tuple(pag_layers), float(pag_adaptive_scale)
        self.adaptive_threshold = adaptive_threshold

    def default_scale(self, cfg_default: float) -> float:
        """This guidance's default in place of a default CFG scale: CFG++ takes a lambda in [0, 1], so a
        CFG default above 1 becomes `CFGPP_DEFAULT` (1, no guidance, stays as it is)."""
        return CFGPP_DEFAULT if self.kind.startswith("cfgpp") and cfg_default > 1 else cfg_default

    def build(self, scale: float):
        """The guidance at `scale` (the options were checked when the spec was made)."""
        from diffedit.guidance.cfg import CFG
        from diffedit.guidance.cfgpp import CFGpp
        from diffedit.guidance.pag import PAG

        base = CFGpp(scale) if self.kind.startswith("cfgpp") else CFG(scale)
        if self.adaptive_threshold is not None:
            from diffedit.guidance.adaptive import AdaptiveCFG

            return AdaptiveCFG(base, self.adaptive_threshold)
        if self.kind.endswith("pag") and (self.pag_scale or self.pag_adaptive_scale):
            return PAG(base, self.pag_scale, self.pag_layers, self.pag_adaptive_scale)
        return base  # a PAG scale of 0 is the base guidance itself, without the extra branch

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        if self.adaptive_threshold is not None:
            out["adaptive_threshold"] = self.adaptive_threshold
        if "pag" in self.kind:
            out.update(pag_scale=self.pag_scale, pag_layers=list(self.pag_layers),
                       pag_adaptive_scale=self.pag_adaptive_scale)
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> GuidanceSpec:
        data = dict(data or {})
        if "pag_layers" in data:
            data["pag_layers"] = tuple(data["pag_layers"])
        return cls(**data)
