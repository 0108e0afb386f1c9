"""Prompt-to-prompt (Hertz et al., 2022) on our attention-control mechanism.

A source and a target image run side by side in one batch; on the conditional rows the target's
cross-attention maps are taken from the source for the first `cross` fraction of steps (word swap:
position by position; refine: tokens aligned by the model's own tokenizer, new tokens keep their
own maps), the swapped words' for their own `cross_edited` fraction (the paper's per-word schedule,
e.g. 1.0 for the prompt and 0.4 for "lion": the new word starts where the old one was, then
draws its own shape), optionally re-weighted per word, and its self-attention maps are taken from the source
for the first `self_` fraction of steps in layers of at most `self_max_tokens` queries. A local
blend keeps the target equal to the source outside the region the blend words attend to.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffedit.editing.attention import AttnCall, Controller
from diffedit.editing.features import with_features
from diffedit.errors import UsageError
from diffedit.sampling import step


@dataclass
class P2PConfig:
    cross: float = 0.4  # fraction of steps with cross-attention replacement (PnP Inversion's default)
    self_: float = 0.6  # fraction of steps with self-attention replacement
    cross_edited: float | None = None  # fraction for the swapped words (None: `cross`)
    mode: str = "auto"  # replace (word swap, equal token counts), refine, or auto
    reweight: dict[str, float] = field(default_factory=dict)  # target word -> factor
    blend: list[str] = field(default_factory=list)  # words whose attention marks the editable region
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    self_max_tokens: int = 32 * 32

    def check(self) -> None:
        for name, v in (("--cross-replace", self.cross), ("--self-replace", self.self_),
                        ("--cross-replace-edited", self.cross_edited),
                        ("--blend-threshold", self.blend_threshold), ("--blend-start", self.blend_start)):
            if v is None:
                continue
            if not 0 <= v <= 1:
                raise UsageError(f"{name} {v} must be in [0, 1]")
        if self.mode not in ("auto", "replace", "refine"):
            raise UsageError(f"--p2p-mode {self.mode!r}: use auto, replace or refine")


def word_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without the start/end tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def check_length(tokenizer, prompt: str, what: str) -> None:
    n = len(word_tokens(tokenizer, prompt)) + 2
    if n > tokenizer.model_max_length:
        raise UsageError(f"{what} prompt has {n} tokens; the model takes at most {tokenizer.model_max_length}")


def find_word(tokenizer, prompt_ids: list[int], word: str, what: str) -> list[int]:
    """Positions (with the start token at 0) of `word`'s tokens in a prompt."""
    ids = word_tokens(tokenizer, word)
    for start in range(len(prompt_ids) - len(ids) + 1):
        if ids and prompt_ids[start : start + len(ids)] == ids:
            return [1 + start + j for j in range(len(ids))]
    raise UsageError(f"word {word!r} is not in the {what} prompt")


def align(tokenizer, source: str, target: str, mode: str, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each target token position: the source position whose map it takes, whether it takes it,
    and whether it is a swapped word (a word swap's token that differs from the source's)."""
    src, tgt = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    if mode == "auto":
        mode = "replace" if len(src) == len(tgt) else "refine"
    mapper, alphas, swapped = torch.arange(length), torch.ones(length), torch.zeros(length, dtype=torch.bool)
    if mode == "replace":
        if len(src) != len(tgt):
            raise UsageError(f"word swap needs prompts of equal token counts ({len(src)} vs {len(tgt)}); use refine")
        swapped[1 : 1 + len(tgt)] = torch.tensor(src) != torch.tensor(tgt)
        return mapper, alphas, swapped
    alphas[1 : 1 + len(tgt)] = 0.0
    for block in difflib.SequenceMatcher(a=src, b=tgt, autojunk=False).get_matching_blocks():
        for j in range(block.size):
            mapper[1 + block.b + j], alphas[1 + block.b + j] = 1 + block.a + j, 1.0
    shift = len(tgt) - len(src)  # the end token and padding follow the prompt
    tail = torch.arange(1 + len(tgt), length)
    mapper[tail] = (tail - shift).clamp(0, length - 1)
    return mapper, alphas, swapped  # refine: unmatched (new or changed) tokens keep their own maps


class PromptToPrompt(Controller):
    """Edits the target rows from the source rows: each branch chunk holds one source row per image,
    then one target row per image, and target k follows source k with its pair's token alignment."""

    def __init__(self, config: P2PConfig, steps: int, grid: tuple[int, int], mapper, alphas, swapped,
                 equalizer=None, blend=None, store: bool = False):
        super().__init__()
        self.config, self.steps, self.grid = config, steps, grid
        self.mapper, self.alphas, self.equalizer = mapper, alphas, equalizer  # [images, tokens] each
        # the step at which each target token stops borrowing the source's map
        edited = config.cross if config.cross_edited is None else config.cross_edited
        self.until = torch.where(swapped, round(edited * steps), round(config.cross * steps))
        self.blend, self.store = blend, store
        self.stored: torch.Tensor | None = None  # summed cross-attention maps of the cond rows
        self.stored_count = 0

    def _cross_active(self, step: int) -> bool:
        return step < int(self.until.max())

    def _self_active(self, call: AttnCall) -> bool:
        return call.step < round(self.config.self_ * self.steps) and call.image_tokens <= self.config.self_max_tokens

    def qkv(self, call, q, k, v):
        # self-attention replacement: the target's maps are the source's, softmax(q_s k_s^T) v_t, taken
        # by attending with the source's queries and keys, so no [queries, keys] map is materialised
        if call.cross or call.joint or "cond" not in call.branches or not self._self_active(call):
            return q, k, v
        rows, images = call.rows(q.shape[0], "cond"), len(self.mapper)
        source, target = slice(rows.start, rows.start + images), slice(rows.start + images, rows.start + 2 * images)
        q, k = q.clone(), k.clone()
        q[target], k[target] = q[source], k[source]
        return q, k, v

    def wants_maps(self, call):
        return "cond" in call.branches and call.cross and not call.joint and (
            self._cross_active(call.step) or self.blend is not None or self.store)

    def maps(self, call, probs):
        chunk = probs[call.rows(probs.shape[0], "cond")]  # [sources + targets, heads, queries, keys], a view
        images = len(self.mapper)
        source, target = chunk[:images], chunk[images:]
        if self.blend is not None or self.store:
            self._record(call, chunk)
        if self._cross_active(call.step):
            for k in range(images):  # each pair its own alignment (a loop over rows, not forwards)
                alphas = self.alphas[k] * (call.step < self.until[k])
                mapper, alphas = self.mapper[k].to(probs.device), alphas.to(probs.device, probs.dtype)
                edited = source[k][..., mapper] * alphas + target[k] * (1 - alphas)
                if self.equalizer is not None:
                    edited = edited * self.equalizer[k].to(probs.device, probs.dtype)
                target[k].copy_(edited)
        return probs

    def _record(self, call: AttnCall, chunk: torch.Tensor) -> None:
        """Accumulate the cond rows' cross maps at the latent grid, for local blend and previews."""
        maps = grid_maps(chunk, self.grid)
        if self.blend is not None:
            self.blend.add(maps)
        if self.store:
            self.stored = maps if self.stored is None else self.stored + maps
            self.stored_count += 1


def grid_maps(chunk: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cross maps [items, heads, queries, keys] -> head-averaged [items, keys, h, w] on the latent grid."""
    maps = chunk.mean(1)
    side = math.sqrt(grid[0] * grid[1] / maps.shape[1])
    h, w = round(grid[0] / side), round(grid[1] / side)
    maps = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h, w)
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)


class LocalBlend:
    """Mask of where the blend words attend, per image; outside it the target stays the source.

    The maps it is given hold `roles` rows per image, role by role (e.g. all sources, then all
    targets); `positions[r]` are the blend words' token positions in row r."""

    def __init__(self, positions: list[list[int]], grid: tuple[int, int], threshold: float, images: int = 1):
        self.positions, self.grid, self.threshold, self.images = positions, grid, threshold, images
        self.sum: torch.Tensor | None = None

    def add(self, maps: torch.Tensor) -> None:
        self.sum = maps if self.sum is None else self.sum + maps

    def take_mask(self) -> torch.Tensor | None:
        """[images, 1, h, w]: per image, the union over its rows of their words' normalised, dilated,
        thresholded maps, from the maps recorded during this step (which are then cleared); None if
        none were recorded.

        Normalised from the map's floor to its peak, not by its peak alone: every position gives a
        word some attention, and on a map whose floor is most of its peak (the toy model's, and SD's
        at high noise) dividing by the peak put the whole grid above the threshold."""
        maps, self.sum = self.sum, None
        if maps is None:
            return None
        masks = torch.zeros(self.images, 1, *maps.shape[-2:], dtype=torch.bool, device=maps.device)
        for row, pos in enumerate(self.positions):
            if not pos:
                continue
            m = maps[row, pos].sum(0, keepdim=True)[None]
            m = F.max_pool2d(m, 3, stride=1, padding=1)
            masks[row % self.images] |= ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-8) > self.threshold)[0]
        return masks.float()

    def apply(self, x: torch.Tensor, active: bool = True) -> torch.Tensor:
        """x = [sources, targets]: keep each target equal to its source outside this step's mask."""
        mask = self.take_mask()
        if not active or mask is None:
            return x
        mask = mask.to(x.device, x.dtype)
        x, k = x.clone(), self.images
        x[k:] = x[:k] + mask * (x[k:] - x[:k])
        return x


def blend_positions(tokenizer, source: str, target: str, words: list[str]) -> list[list[int]]:
    """Token positions of the blend words in the source and in the target prompt."""
    where: list[list[int]] = [[], []]
    for word in words:
        found = False
        for item, prompt in enumerate((source, target)):
            try:
                where[item] += find_word(tokenizer, word_tokens(tokenizer, prompt), word, "")
                found = True
            except UsageError:
                pass
        if not found:
            raise UsageError(f"blend word {word!r} is in neither the source nor the target prompt")
    return where


def build_p2p(tokenizer, pairs: list[tuple[str, str]], config: P2PConfig, steps: int, grid: tuple[int, int],
              store: bool = False) -> PromptToPrompt:
    """Controller for (source, target) prompt pairs, one per image, with checks on words and lengths."""
    config.check()
    length = tokenizer.model_max_length
    mappers, alphas, swaps, equalizers, blends = [], [], [], [], []
    for source, target in pairs:
        check_length(tokenizer, source, "source")
        check_length(tokenizer, target, "target")
        mapper, alpha, swapped = align(tokenizer, source, target, config.mode, length)
        mappers.append(mapper)
        alphas.append(alpha)
        swaps.append(swapped)
        tgt_ids = word_tokens(tokenizer, target)
        equalizer = torch.ones(length)
        for word, factor in config.reweight.items():
            equalizer[find_word(tokenizer, tgt_ids, word, "target")] = factor
        equalizers.append(equalizer)
        if config.blend:
            blends.append(blend_positions(tokenizer, source, target, config.blend))
    blend = None
    if config.blend:  # rows of the maps: every source, then every target
        positions = [b[0] for b in blends] + [b[1] for b in blends]
        blend = LocalBlend(positions, grid, config.blend_threshold, images=len(pairs))
    equalizer = torch.stack(equalizers) if config.reweight else None
    return PromptToPrompt(config, steps, grid, torch.stack(mappers), torch.stack(alphas), torch.stack(swaps),
                          equalizer, blend, store)


def p2p_config(params) -> P2PConfig:
    """The controller settings of an engine's prompt-to-prompt parameters."""
    return P2PConfig(cross=params.cross_replace, self_=params.self_replace, cross_edited=params.cross_replace_edited,
                     mode=params.p2p_mode,
                     reweight=dict(params.reweight), blend=list(params.blend), blend_threshold=params.blend_threshold)


@torch.inference_mode()
def paired_edit(run, x_source: torch.Tensor, x_target: torch.Tensor, pinned: list[torch.Tensor] | None = None,
                background: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sample each image's source and target in one batch under prompt-to-prompt control; the rows
    are all sources, then all targets.

    With `pinned` (the sources' inversion trajectory, noisiest first), the source rows are put back
    on it after every step: Direct Inversion's exact source branch, whose attention the targets
    follow. With `background` (a trajectory in the same order), the target rows keep it outside the
    run's edit mask. Returns the final target latents.
    """
    if not hasattr(run.model.pipe, "unet"):
        raise UsageError(f"prompt-to-prompt needs cross-attention layers (sd1, sd2, sdxl), not {run.model.name}")
    schedule, k = run.schedule, run.images
    h, w = x_source.shape[-2:]
    config = p2p_config(run.params)
    controller = build_p2p(run.model.pipe.tokenizer, list(zip(run.sources, run.targets)), config, len(schedule),
                           (h, w), store=run.show_attention)
    denoise = run.denoiser_for([*run.sources, *run.targets],
                               with_features(controller, run.params, len(schedule), images=k))
    x = torch.cat([x_source, x_target])
    blend_from = round(config.blend_start * len(schedule))
    for i in range(len(schedule)):
        x0, eps = denoise(x, schedule, i)
        x = step(x0, eps, schedule.a[i + 1], schedule.s[i + 1])
        if pinned is not None:
            x[:k] = pinned[i + 1]
        if background is not None:
            x[k:] = run.keep(x[k:], background[i + 1])
        if controller.blend is not None:
            x = controller.blend.apply(x, active=i >= blend_from)
        if run.callback:
            run.callback(i, x, x0)
    if run.show_attention and controller.stored is not None:
        run.extras["attention"] = (controller.stored / controller.stored_count)[k]  # the first target's maps
        run.extras["tokens"] = run.model.pipe.tokenizer.convert_ids_to_tokens(
            run.model.pipe.tokenizer(run.targets[0]).input_ids)
    return x[k:]


def attention_grid(maps: torch.Tensor, tokens: list[str], cell: int = 96):
    """A PNG-ready grid: one heat map per prompt token (start token to end token), labelled."""
    from PIL import Image, ImageDraw

    n = len(tokens)
    grid = Image.new("RGB", (cell * n, cell + 14), "white")
    draw = ImageDraw.Draw(grid)
    for j, token in enumerate(tokens):
        m = maps[j].float()
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
        heat = Image.fromarray((m.cpu().numpy() * 255).astype("uint8")).resize((cell, cell), Image.NEAREST)
        grid.paste(heat.convert("RGB"), (j * cell, 14))
        draw.text((j * cell + 2, 1), token.replace("</w>", "")[:12], fill="black")
    return grid
