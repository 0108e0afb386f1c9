"""SPM: concept erasure with one-dimensional adapters ("semi-permeable membranes", Lyu et al. 2024).

A membrane is a rank-1 branch `up(down(x))` added to the output of every Linear and Conv2d inside the
network's transformer blocks (UNets: every `Transformer2DModel` - proj_in/out, self- and
cross-attention q/k/v/out, feed-forward; SD3/Flux: every transformer block). `up` starts at zero,
so a fresh membrane is the identity. One file per concept (`.spm.safetensors`), loadable onto any
model of the family it was trained on.

Multiplier semantics (decided here, see the methods notes): a multiplier `m` scales the membrane's
*product* once, `out + m * (alpha / rank) * up(down(x))`. The paper's inference code scales both
factors' weights, which scales the product by `m^2`; linear scaling keeps `m = 0.5` meaning "half
the membrane" and makes several membranes on one layer a plain sum of their multiplied branches.

Facilitated transport: each membrane's multiplier is set per prompt, i.e. per row of the network's
batch (CFG's conditional and unconditional branches each get their own), by `transport`:
  - `paper`: max(cos of the flattened text embeddings, token overlap) against the erased prompts
    (the paper's "clipcos_tokenuni");
  - `calibrated` (default): the same with the cosine rescaled against the empty prompt's,
    `clamp((cos(p, c) - cos("", c)) / (1 - cos("", c)), 0, 1)`, so the empty prompt gets exactly 0 and
    a prompt counts as similar only in so far as it is closer to the concept than the empty prompt is
    (on the toy model the raw cosine is 0.98 for "" and 0.75-0.88 for unrelated prompts against
    "red": the paper's metric leaves every membrane almost fully open);
  - `off`: multiplier 1 for every row (the membrane always on).
The multipliers travel with the conditioning (`Cond.tensors["spm"]`, one column per membrane, set
when prompts are encoded) and the Denoiser hands them to the hooks around each forward.

The package: `format` (the adapter files), `runtime` (hooks and transport at sampling time),
`training` (erasing a concept).
"""

from diffedit.editing.spm.format import FORMAT, VERSION, Membrane, check_concept, load_membranes, target_layers
from diffedit.editing.spm.runtime import KEY, TRANSPORTS, Membranes, apply_files, attach, detach
from diffedit.editing.spm.training import TrainConfig, erase_loss, train

__all__ = ["FORMAT", "KEY", "TRANSPORTS", "VERSION", "Membrane", "Membranes", "TrainConfig", "apply_files", "attach",
           "check_concept", "detach", "erase_loss", "load_membranes", "target_layers", "train"]
