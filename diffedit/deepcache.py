"""DeepCache (Ma, Fang, Wang, CVPR 2024): reuse a UNet's deep features across adjacent steps.

The deep blocks of a UNet change slowly from one denoising step to the next, while the outermost
down/up pair carries the detail. Every `interval`-th step runs the whole network and keeps what each
deep block returned; the steps in between run only the input convolution, the first down block, the
last up block (fed with the cached features) and the output layers. It works by standing in for the
deep blocks' `forward` during a step, so diffusers' own UNet code runs unchanged, and restores them
after every step, also on error.
"""

from __future__ import annotations

from contextlib import contextmanager

from diffedit.errors import UsageError


class DeepCache:
    def __init__(self, network, interval: int):
        if not hasattr(network, "up_blocks"):
            raise UsageError("--deepcache needs a UNet model (SD1, SD2, SDXL), not a transformer")
        if interval < 2:
            raise UsageError(f"--deepcache {interval}: the interval must be at least 2 (1 would cache nothing)")
        self.interval = interval
        self.deep = [*network.down_blocks[1:], network.mid_block, *network.up_blocks[:-1]]
        self.cache: dict[int, object] | None = None
        self.batch: int | None = None
        self.full_steps = 0

    @contextmanager
    def step(self, i: int, batch: int):
        """Around the network call of step `i` with `batch` rows."""
        full = self.cache is None or i % self.interval == 0 or batch != self.batch
        outputs: dict[int, object] = {}
        for block in self.deep:
            block.forward = self._recording(block, outputs) if full else self._cached(self.cache[id(block)])
        try:
            yield
        finally:
            for block in self.deep:
                del block.forward  # the class's own forward again
        if full:
            self.cache, self.batch = outputs, batch
            self.full_steps += 1

    @staticmethod
    def _recording(block, outputs):
        def forward(*args, **kwargs):
            out = type(block).forward(block, *args, **kwargs)
            outputs[id(block)] = out
            return out
        return forward

    @staticmethod
    def _cached(out):
        return lambda *args, **kwargs: out
