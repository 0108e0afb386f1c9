"""Training the toy model from a seed: the VAE first, then the UNet on pre-encoded latents.

Reproducible (every batch is drawn from generators seeded by the seed and the step) and resumable
(checkpoints every `checkpoint_every` steps in a work folder outside git). Facts behind the choices
are in samples/toy-sd/v3.md (the VAE and phases 1-7) and README.md (v4): object pixels weighted x10 in the VAE loss (else it learns the background),
photo crops mixed in so real photos round-trip, one process using both cores.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from diffedit.editing.attention import AttentionControl, Controller
from diffedit.toy.shapes import OBJECT_COUNTS, make_scene, user_caption
from lab.testing import SD_SCHEDULE
from lab.toy import model as toy


@dataclass
class TrainConfig:
    seed: int = 0
    vae_width: int = 48  # VAE channels (w, 2w, 2w)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    decoder_steps: int = 1000
    decoder_mse_steps: int = 1300
    decoder_plain_fraction: float = 0.5  # phase 5's share of plain-colour scenes
    decoder_saturated_fraction: float = 0.5  # of its plain colours: on the RGB cube's surface (a channel at 0 or 255)
    decoder_whole_plain_fraction: float = 0.0  # of its plain scenes: the whole image that colour, no objects
    plain_decoder_steps: int = 3000  # phase 6: the same tuning again, longer, most scenes on plain colours; 0 skips it
    plain_decoder_fraction: float = 0.85  # phase 6's share of plain-colour scenes
    photo_fraction: float = 0.3
    plain_fraction: float = 0.2  # of the scenes: on a random plain colour, pure white and black included
    dataset: int = 20_000
    # The UNet's scenes (phases 3 and 7): chances of 1, 2, 3 objects; more pairs than the world's random
    # scenes (OBJECT_COUNTS), which v4 needed to bind two-object prompts (samples/toy-sd/README.md).
    object_counts: tuple[float, float, float] = (0.35, 0.4, 0.25)
    unet_steps: int = 4000
    unet_batch: int = 48
    unet_lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    caption_dropout: float = 0.1
    text_context: str = "previous"  # what each text token sees: its own word (v2, v3), the word before too (v4), or CLIP's causal mix
    layout_steps: int = 600  # phase 3b (`tune_layout`); 0 skips it
    relayout_steps: int = 300  # phase 7: phase 3b again on the saved model, next seed (`tune_saved_layout`); 0 skips it
    relayout_seed: int | None = None  # phase 7's scenes, swaps and batches; None: seed + 1
    layout_pairs: int = 4000
    layout_batch: int = 16  # colour swaps per step, beside the plain batch
    reshape_layout_steps: int = 0  # phase 8: the layout loss with shape swaps too, the seed after phase 7's; 0 skips it
    reshape_batch: int = 16  # phase 8's shape swaps per step, beside its colour swaps
    reshape_held: float = 0.6  # of the steps, noisiest first: a shape swap's new word takes the old word's map
    layout_lr: float = 2e-4
    grounding: float = 0.05  # weight of the token-grounding loss in the layout phases on a saved model (7, 8, `toy tune-layout`)
    grounding_below: int = 500  # the grounding only on noise levels (DDPM timesteps) under this; 1000: all
    checkpoint_every: int = 200


def photo_sources() -> list[np.ndarray]:
    """scikit-image's bundled sample photographs (no download), as RGB uint8."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
             "retina", "colorwheel", "camera", "coins", "moon", "page", "grass", "gravel", "brick"]
    photos = []
    for name in names:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return photos


def photo_crop(photos: list[np.ndarray], rng: np.random.Generator, size: int = 64) -> np.ndarray:
    img = photos[rng.integers(len(photos))]
    h, w = img.shape[:2]
    side = int(rng.integers(size, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return cv2.resize(img[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)


def plain_colour(rng: np.random.Generator, saturated: float = 0.0) -> np.ndarray:
    """Pure white, pure black or any RGB colour: the backgrounds the world's palette does not have.

    A `saturated` share of the colours lies on the RGB cube's surface (each channel at 0 or 255 with
    even odds, at least one): pure red, blue, yellow and their edges, which a uniform draw all but
    never reaches (every channel within 2 levels of 0 or 255: one draw in 78 000)."""
    kind = rng.random()
    if kind < 0.25:
        return np.array([255, 255, 255], np.uint8)
    if kind < 0.5:
        return np.array([0, 0, 0], np.uint8)
    colour = rng.integers(0, 256, 3)
    if rng.random() < saturated:
        ends = rng.random(3) < 0.5
        ends[rng.integers(3)] = True
        colour[ends] = 255 * rng.integers(0, 2, int(ends.sum()))
    return colour.astype(np.uint8)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def _load(path: Path):
    return torch.load(path, weights_only=True) if path.exists() else None


def _vae_batch(config: TrainConfig, photos, phase: int, step: int, plain_fraction: float, saturated: float = 0.0,
               whole: float = 0.0):
    """A seeded batch of scenes and photo crops, with per-pixel loss weights (objects x10); a `whole`
    share of the plain scenes is one colour throughout."""
    rng = np.random.default_rng([config.seed, phase, step])
    images, weights = [], []
    for _ in range(config.vae_batch):
        if rng.random() < config.photo_fraction:
            images.append(photo_crop(photos, rng))
            weights.append(np.full((64, 64), 3.0, np.float32))
        else:
            scene = make_scene(int(rng.integers(2**31)))
            objects = np.any(scene.masks, 0) if scene.masks else np.zeros((64, 64), bool)
            image = scene.image
            if rng.random() < plain_fraction:  # users' scenes come on any plain colour
                image = image.copy()
                colour = plain_colour(rng, saturated)
                if whole and rng.random() < whole:  # drawn only when asked: the shipped batches stay as they were
                    objects = np.zeros_like(objects)
                image[~objects] = colour
            images.append(image)
            weights.append(1.0 + 9.0 * objects.astype(np.float32))
    return to_pixels(np.stack(images)), torch.from_numpy(np.stack(weights))[:, None]


def _fit_vae(config: TrainConfig, vae, params, steps: int, lr: float, checkpoint: Path, phase: int, tick,
             mse_only: bool = False):
    """Train `params` of the VAE for `steps` steps, resumably (from `checkpoint`); `mse_only` drops the
    object weights, the L1 term and the KL (which is constant when the encoder is frozen), measures the
    error on the clamped image and draws `config.decoder_plain_fraction` of the scenes on plain colours,
    `config.decoder_saturated_fraction` of those on the RGB cube's surface."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cosine = lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    start = 0
    state = _load(checkpoint)
    if state is not None:
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    photos = photo_sources()
    plain_fraction = config.decoder_plain_fraction if mse_only else config.plain_fraction
    saturated = config.decoder_saturated_fraction if mse_only else 0.0
    whole = config.decoder_whole_plain_fraction if mse_only else 0.0
    for step in range(start, steps):
        x, w = _vae_batch(config, photos, phase, step, plain_fraction, saturated, whole)
        # Trained on the posterior mode: sampling with the initial unit std drowns the small latents
        # and stalls reconstruction; a tiny KL still keeps the latent scale in check.
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mode()).sample
        if mse_only:
            # On the image users get (clamped to [-1, 1]): pure white and black are then reached by
            # overshooting, where plain MSE pulls them towards the middle (255 came back as 252).
            loss = (decoded.clamp(-1, 1) - x).pow(2).mean()
        else:
            err = decoded - x
            loss = (w * (err.abs() + err.pow(2))).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tick(checkpoint.stem.split("-")[0], step + 1, steps, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            _checkpoint(checkpoint, vae=vae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step + 1)


def _decoder_only(vae) -> list[torch.nn.Parameter]:
    """Freeze the encoder side and put the VAE in training mode; the decoder's parameters to train."""
    vae.requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    vae.train()
    return decoder


def finetune_decoder(config: TrainConfig, vae, work: Path, tick):
    """More decoder training with the encoder frozen: sharper images, same latents (the UNet stays valid)."""
    _fit_vae(config, vae, _decoder_only(vae), config.decoder_steps, config.vae_lr / 2, work / "decoder.ckpt", 2, tick)
    return vae.eval().requires_grad_(False)


def tune_decoder(model_dir: Path, work: Path, config: TrainConfig, tick) -> dict:
    """Phases 5 and 6: train a saved toy model's decoder on MSE (encoder frozen), VAE saved in place.

    The earlier phases' loss (L1 plus object weights) learns objects fast and draws crisp edges, but
    where a sub-pixel edge is uncertain a crisp edge in the wrong place costs more squared error than
    the blend MSE settles on (most of the shapes' error sits on the 1-px band around edges): this
    phase is worth about 4 dB. Measured on the clamped image, with half the scenes on plain colours,
    it also brings pure white and black backgrounds back within 2 levels; phase 6, longer and with most
    scenes plain, brings every plain colour within 2 levels once the latent is refined by decoder
    inversion (samples/toy-sd/v3.md). The latents do not change,
    so the UNet and every model sharing its latents (LCM-LoRA, SPM adapters) stay valid. It starts
    from the saved (fp16) weights, so `diffedit toy tune-decoder` on a saved model is the same
    computation as this phase of `train`.
    """
    from diffusers import AutoencoderKL

    work.mkdir(parents=True, exist_ok=True)
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    # Resume only a tuning of these weights with this recipe (steps, plain, saturated and whole-plain
    # shares, seed, clamped loss).
    recipe = (f"{config.decoder_mse_steps}/{config.decoder_plain_fraction}/{config.decoder_saturated_fraction}/"
              f"{config.seed}/clamped" + (f"/whole{config.decoder_whole_plain_fraction}"
                                          if config.decoder_whole_plain_fraction else ""))
    start = _start_key([weights], recipe)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=torch.float32)
    _fit_vae(config, vae, _decoder_only(vae), config.decoder_mse_steps, config.vae_lr * 0.3, work / f"decoder_mse-{start}.ckpt",
             3, tick, mse_only=True)
    tuned = AutoencoderKL.from_config({k: v for k, v in vae.config.items() if not k.startswith("_")})
    tuned.load_state_dict(vae.state_dict())  # a fresh module: its saved config names no local path
    _save_in_place(model_dir, {"vae": tuned})
    return {"decoder_mse_steps": config.decoder_mse_steps}


def _start_key(weights: list[Path], recipe: str) -> str:
    """A tuning run's name from the weights it starts from and its recipe: only the same run resumes."""
    return hashlib.sha256(b"".join(w.read_bytes() for w in weights) + recipe.encode()).hexdigest()[:12]


def _save_in_place(model_dir: Path, parts: dict[str, torch.nn.Module]) -> None:
    """Save modules into a saved model's folders (folder name -> module) as fp16 safetensors, each staged
    in `NAME.tmp` and moved in file by file: never a half-written model folder."""
    for name, module in parts.items():
        staged = model_dir / f"{name}.tmp"
        module.to(torch.float16).save_pretrained(staged, safe_serialization=True)
        for f in staged.iterdir():
            f.replace(model_dir / name / f.name)
        staged.rmdir()


def train_vae(config: TrainConfig, work: Path, tick) -> tuple[torch.nn.Module, float]:
    vae = toy.make_vae(config.vae_width)
    _fit_vae(config, vae, list(vae.parameters()), config.vae_steps, config.vae_lr, work / "vae.ckpt", 1, tick)
    vae.eval().requires_grad_(False)
    with torch.inference_mode():  # scaling factor: unit standard deviation of scene latents
        sample = to_pixels(np.stack([make_scene(10**9 + i).image for i in range(512)]))
        std = float(vae.encode(sample).latent_dist.mode().std())
    return vae, 1.0 / std


def _encode_scenes(vae, scale: float, scenes, count: int, tick=None, label: str = "encode"):
    """Latents and captions of `count` scenes, `scenes(start, stop)` drawing them 256 at a time (the
    images of a whole dataset at once would not fit in memory)."""
    latents, captions = [], []
    for start in range(0, count, 256):
        stop = min(start + 256, count)
        chunk = scenes(start, stop)
        with torch.inference_mode():
            latents.append(vae.encode(to_pixels(np.stack([s.image for s in chunk]))).latent_dist.mode() * scale)
        captions += [s.caption for s in chunk]
        if tick is not None:
            tick(label, stop, count, 0.0)
    return torch.cat(latents).clone(), captions  # clone: a plain tensor that training may use


def encode_dataset(config, vae, scale: float, work: Path, tick, object_counts=OBJECT_COUNTS):
    """`config.dataset` scenes of `config.seed` (with `object_counts`' chances of 1, 2, 3 objects), encoded
    once and cached in `work`."""
    cache = work / "latents.pt"
    state = _load(cache)
    counts = list(object_counts)
    if (state is not None and state["scale"] == scale and len(state["captions"]) == config.dataset
            and state.get("seed", 0) == config.seed and state.get("object_counts", list(OBJECT_COUNTS)) == counts):
        return state["latents"], state["captions"]
    latents, captions = _encode_scenes(
        vae, scale, lambda a, b: [make_scene(config.seed * 10**7 + i, object_counts=counts) for i in range(a, b)],
        config.dataset, tick)
    _checkpoint(cache, latents=latents, captions=captions, scale=scale, seed=config.seed, object_counts=counts)
    return latents, captions


def fit_denoiser(config, make_net, prepare, loss_of, latents, captions, steps: int, batch: int, lr: float,
                 checkpoint: Path, phase: str, tick, rewrite=None):
    """Train a fresh `make_net()` (`prepare`d) for `steps` steps of `loss_of(net, gen, z0, texts)`,
    resumably (`checkpoint`); AdamW with warm-up and cosine decay to lr/10, EMA weights returned.
    `rewrite(caption, rng)`, if given, turns each drawn caption into another form of it."""
    net, ema = make_net(), make_net().requires_grad_(False)
    prepare(net), prepare(ema)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    lr_at = lambda s: min(1.0, (s + 1) / config.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = 0
    state = _load(checkpoint)
    if state is not None:
        net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    net.train()
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 7 * step + 1)
        idx = torch.randint(0, len(captions), (batch,), generator=gen)
        texts = [captions[i] if torch.rand(1, generator=gen) >= config.caption_dropout else "" for i in idx.tolist()]
        if rewrite is not None:
            rng = np.random.default_rng([config.seed, 4, step])
            texts = [rewrite(text, rng) if text else "" for text in texts]
        loss = loss_of(net, gen, latents[idx], texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        tick(phase, step + 1, steps, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            _checkpoint(checkpoint, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        sched=sched.state_dict(), step=step + 1)
    return ema.eval()


class TextConditioned(torch.nn.Module):
    """The UNet and its text encoder, trained (and averaged) together: word tokens learn embeddings
    that the UNet's cross-attention can find the objects by, as CLIP's do for Stable Diffusion."""

    def __init__(self, tokenizer, text_context: str):
        super().__init__()
        self.unet = toy.make_unet()
        self.text_encoder = toy.trainable_text_encoder(toy.make_text_encoder(tokenizer, text_context))


def _token_ids(tokenizer, texts) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _embed(text_encoder, tokenizer, texts) -> torch.Tensor:
    return text_encoder(_token_ids(tokenizer, texts))[0]


def _mix(ab, z0, eps):
    """x_t at level abar_t: the clean latents and the noise in DDPM's proportions."""
    return ab.sqrt() * z0 + (1 - ab).sqrt() * eps


def _noised(abar, gen, z0):
    """A random level per row, its noise and the noised latents: (t, eps, abar_t, x_t)."""
    t = torch.randint(0, 1000, (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    ab = abar[t].view(-1, 1, 1, 1)
    return t, eps, ab, _mix(ab, z0, eps)


def _min_snr_loss(pred, eps, ab):
    """Epsilon loss with min-SNR-5 weighting: faster, steadier training."""
    snr = ab / (1 - ab)
    return (torch.clamp(snr, max=5.0) / snr * (pred - eps).pow(2)).mean()


def _denoising_loss(net, tokenizer, abar, gen, z0, texts):
    t, eps, ab, x = _noised(abar, gen, z0)
    return _min_snr_loss(net.unet(x, t, encoder_hidden_states=_embed(net.text_encoder, tokenizer, texts)).sample, eps, ab)


def _sd_alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}).alphas_cumprod


def train_unet(config: TrainConfig, latents, captions, tokenizer, work: Path, tick):
    """UNet and text encoder on the latents, with captions in the forms people write them."""
    abar = _sd_alphas_cumprod()
    net = fit_denoiser(config, lambda: TextConditioned(tokenizer, config.text_context), lambda net: None,
                       lambda net, gen, z0, texts: _denoising_loss(net, tokenizer, abar, gen, z0, texts),
                       latents, captions, config.unet_steps, config.unet_batch, config.unet_lr, work / "unet.ckpt",
                       "unet", tick, rewrite=user_caption)
    return net.unet, net.text_encoder.eval()


class PairedMaps(Controller):
    """Training only: the second half of the batch attends with the first half's attention maps (every
    layer, self and cross), detached, so the maps are learned by plain denoising alone and the second
    half keeps only its own values, text and convolutions: what prompt-to-prompt leaves to a target.
    `released` (second-half rows × text tokens) marks the tokens whose cross-attention maps a row keeps
    as its own: a swapped word after prompt-to-prompt lets it go (`cross_replace_edited`).
    With `token_masks` it also scores how well the first half's cross-attention keeps each object word
    on its object (`_grounding_loss`, one term per layer in `grounding`)."""

    def __init__(self, released: torch.Tensor | None = None, token_masks: torch.Tensor | None = None):
        super().__init__()
        self.released, self.token_masks, self.grounding = released, token_masks, []

    def wants_maps(self, call):
        return True

    def maps(self, call, probs):
        source, own = probs[: len(probs) // 2], probs[len(probs) // 2:]
        if call.cross and self.token_masks is not None:
            self.grounding.append(_grounding_loss(source, self.token_masks))
        target = source.detach()
        if call.cross and self.released is not None:
            target = torch.where(self.released[:, None, None, :], own, target)
        return torch.cat([source, target])


def inside_share(probs: torch.Tensor, token_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On one cross-attention layer, the share of each word's attention mass that falls inside its
    object, [rows, tokens], and which words name an object at all. `probs` [rows, heads, queries, tokens];
    `token_masks` [rows, tokens, h, w] (`object_token_masks`; 0 for words of no object)."""
    maps = probs.mean(1)  # [rows, queries, tokens]
    masks = F.adaptive_avg_pool2d(token_masks, math.isqrt(maps.shape[1])).flatten(2)  # [rows, tokens, queries]
    share = torch.einsum("rqk,rkq->rk", maps, masks) / maps.sum(1).clamp_min(1e-8)
    return share, token_masks.flatten(2).amax(-1) > 0


def _grounding_loss(probs: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., 2024) on one cross-attention layer: for each object word,
    (1 - the share of its attention mass inside its object)^2, averaged over the words."""
    share, grounded = inside_share(probs, token_masks)
    return ((1 - share) ** 2)[grounded].mean() if grounded.any() else probs.sum() * 0


def object_token_masks(tokenizer, texts: list[str], scenes: list) -> torch.Tensor:
    """[rows, tokens, 16, 16]: for each caption, each object's colour and shape words marked with where
    that object is (area share per latent pixel); words of no object, and rows whose scene is None,
    stay 0. Objects named alike share their words, so those words mark all of them."""
    ids = _token_ids(tokenizer, texts)
    vocab = tokenizer.get_vocab()
    masks = torch.zeros(*ids.shape, 16, 16)
    for row, scene in enumerate(scenes):
        for obj, mask in zip(scene.objects, scene.masks) if scene is not None else ():
            colour, shape = vocab[f"{obj.colour}</w>"], vocab[f"{obj.shape}</w>"]
            area = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None], 16)[0]
            for p in ((ids[row, :-1] == colour) & (ids[row, 1:] == shape)).nonzero().flatten().tolist():
                masks[row, p] = masks[row, p + 1] = torch.maximum(masks[row, p], area)
    return masks


def swap_scenes(config: TrainConfig, attribute: str) -> list[tuple]:
    """`config.layout_pairs` (scene, the same scene with one object's `attribute`, "colour" or "shape",
    changed and nothing else), seeded, from scenes apart from the UNet's dataset."""
    from diffedit.toy.shapes import COLOURS, SHAPES, with_object

    values = {"colour": list(COLOURS), "shape": list(SHAPES)}[attribute]
    stream = {"colour": 5, "shape": 6}[attribute]
    rng = np.random.default_rng([config.seed, stream])
    pairs, seed = [], config.seed * 10**7 + stream * 10**6
    while len(pairs) < config.layout_pairs:
        scene, seed = make_scene(seed), seed + 1
        if not scene.objects:
            continue
        index = int(rng.integers(len(scene.objects)))
        value = str(rng.choice([v for v in values if v != getattr(scene.objects[index], attribute)]))
        pairs.append((scene, with_object(scene, index, **{attribute: value})))
    return pairs


def swaps(config: TrainConfig, vae, scale: float, work: Path, tick, attribute: str = "colour") -> dict:
    """`swap_scenes` encoded once (cached in `work`), with their captions."""
    cache = work / ("pairs.pt" if attribute == "colour" else f"pairs-{attribute}.pt")
    state = _load(cache)
    if (state is not None and state["scale"] == scale and len(state["source_captions"]) == config.layout_pairs
            and state.get("seed", 0) == config.seed):
        return state
    pairs = swap_scenes(config, attribute)
    state = {"scale": scale, "seed": config.seed}
    for side, name in enumerate(("sources", "targets")):
        state[name], state[f"{name[:-1]}_captions"] = _encode_scenes(
            vae, scale, lambda a, b: [pair[side] for pair in pairs[a:b]], len(pairs), tick, f"encode {attribute} {name}")
    _checkpoint(cache, **state)
    return state


def tune_layout(config: TrainConfig, unet, text_encoder, tokenizer, latents, captions, pairs, work: Path, tick,
                checkpoint: Path | None = None, shape_pairs: dict | None = None):
    """Phase 3b: the trained UNet and text encoder, further trained so that their layout follows the
    attention maps. Each step adds to the plain denoising batch `config.layout_batch` colour swaps:
    the source scene noised and denoised with its own caption, beside a row with the swapped colour
    word (fed the same noisy source, or the recoloured scene under the same noise) that takes every
    attention map from the source row (`PairedMaps`) and is asked for the recoloured scene. A one-word
    edit with the maps kept then changes the colour and nothing else, which is what prompt-to-prompt
    assumes of Stable Diffusion (measured: samples/toy-sd/v3.md).

    With `shape_pairs` (phase 8), `config.reshape_batch` shape swaps join them, asked for the reshaped
    scene under a reshape's schedule: every map from the source, except that the new shape word keeps
    its own cross-attention map once the noisiest `config.reshape_held` of the steps are past.

    With `config.grounding` > 0 the colour swaps' source rows also pay that times the token-grounding
    loss (`_grounding_loss`, averaged over the UNet's cross-attention layers): each object word's map
    kept on its object, so that a word swapped by an edit reaches that object and not the rest, on the
    noise levels under `config.grounding_below`."""
    abar = _sd_alphas_cumprod()
    sources = [pair[0] for pair in swap_scenes(config, "colour")] if config.grounding else None
    if sources is not None and [scene.caption for scene in sources] != pairs["source_captions"]:
        raise RuntimeError("the cached colour swaps are not this config's; delete pairs.pt in the work folder")
    released_below = round(1000 * (1 - config.reshape_held))  # timesteps under it: the new word's own map
    sets = [(pairs, config.layout_batch, False)]
    if shape_pairs is not None and config.reshape_batch:
        sets.append((shape_pairs, config.reshape_batch, True))

    def make_net():
        net = TextConditioned(tokenizer, config.text_context)
        net.unet.load_state_dict(unet.state_dict()), net.text_encoder.load_state_dict(text_encoder.state_dict())
        return net

    def loss_of(net, gen, z0, texts):
        plain = _denoising_loss(net, tokenizer, abar, gen, z0, texts)
        forms = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        source_texts, target_texts, zs, zt, releases, scenes = [], [], [], [], [], []
        for swaps_, count, release in sets:
            idx = torch.randint(0, len(swaps_["source_captions"]), (count,), generator=gen).tolist()
            for i in idx:  # the same form (order, articles, background phrase) for both captions of a pair
                seed = int(forms.integers(2**31))
                source_texts.append(user_caption(swaps_["source_captions"][i], np.random.default_rng(seed)))
                target_texts.append(user_caption(swaps_["target_captions"][i], np.random.default_rng(seed)))
            zs.append(swaps_["sources"][idx]), zt.append(swaps_["targets"][idx])
            releases += [release] * count
            scenes += [sources[i] if sources is not None and swaps_ is pairs else None for i in idx]
        zs, zt = torch.cat(zs), torch.cat(zt)
        t, eps, ab, x = _noised(abar, gen, zs)
        # The swapped row starts from the source scene (an edit's first steps, where the two branches
        # still share their latents) or, half the time, from its own scene under the same noise (later
        # steps, where the target has become its own): the source's maps either way.
        own = (torch.rand(len(zs), generator=gen) < 0.5).view(-1, 1, 1, 1)
        x_target = torch.where(own, _mix(ab, zt, eps), x)
        ids = _token_ids(tokenizer, source_texts + target_texts)
        late = torch.tensor(releases) & (t < released_below)
        released = (ids[: len(zs)] != ids[len(zs):]) & late[:, None]  # the swapped word's column, late
        emb = net.text_encoder(ids)[0]
        token_masks = object_token_masks(tokenizer, source_texts, scenes) if sources is not None else None
        if token_masks is not None:
            token_masks[t >= config.grounding_below] = 0  # no object drawn yet for a word to land on
        control = PairedMaps(released, token_masks)
        with AttentionControl(net.unet, control):
            pred = net.unet(torch.cat([x, x_target]), t.repeat(2), encoder_hidden_states=emb).sample
        eps_target = (x_target - ab.sqrt() * zt) / (1 - ab).sqrt()  # what takes x_target to the edited scene
        swapped = _min_snr_loss(pred, torch.cat([eps, eps_target]), ab.repeat(2, 1, 1, 1))
        if control.grounding:
            swapped = swapped + config.grounding * torch.stack(control.grounding).mean()
        return plain + swapped

    net = fit_denoiser(config, make_net, lambda net: None, loss_of, latents, captions, config.layout_steps,
                       config.unet_batch, config.layout_lr, checkpoint or work / "layout.ckpt", "layout", tick,
                       rewrite=user_caption)
    return net.unet, net.text_encoder.eval()


def tune_saved_layout(model_dir: Path, work: Path, config: TrainConfig, tick) -> dict:
    """Phase 3b again on a saved toy model: its UNet and text encoder trained `config.layout_steps` more
    steps of the layout loss (`tune_layout`; colour swaps and batches drawn from `config.seed`), saved
    in place. The VAE is untouched, so the latents stay; adapters trained on the UNet (LCM-LoRA, SPM)
    attach to the result as to any fine-tune of it, but their measured numbers are the old UNet's."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    scale = pipe.vae.config.scaling_factor
    config = replace(config, text_context=toy.text_context(pipe.text_encoder))  # the saved model's, whatever was asked
    weights = [model_dir / part / name for part, name in (("unet", "diffusion_pytorch_model.safetensors"),
                                                          ("text_encoder", "model.safetensors"))]
    recipe = f"{config.layout_steps}/{config.layout_lr}/{config.layout_pairs}/{config.layout_batch}/{config.seed}"
    if config.reshape_batch:
        recipe += f"/{config.reshape_batch}/{config.reshape_held}"
    if config.grounding:
        recipe += f"/grounding {config.grounding}"
    if config.grounding and config.grounding_below < 1000:
        recipe += f" below {config.grounding_below}"
    start = _start_key(weights, recipe)
    latents, captions = encode_dataset(config, pipe.vae, scale, work, tick, config.object_counts)
    pairs = swaps(config, pipe.vae, scale, work, tick)
    shape_pairs = swaps(config, pipe.vae, scale, work, tick, "shape") if config.reshape_batch else None
    unet, text_encoder = tune_layout(config, pipe.unet, pipe.text_encoder, pipe.tokenizer, latents, captions, pairs,
                                     work, tick, checkpoint=work / f"layout-{start}.ckpt", shape_pairs=shape_pairs)
    _save_in_place(model_dir, {"unet": unet, "text_encoder": text_encoder})
    return {"layout_steps": config.layout_steps, "reshape_batch": config.reshape_batch, "seed": config.seed,
            "grounding": config.grounding}


def train(out: Path, work: Path, config: TrainConfig, tick, vae_from: Path | None = None) -> dict:
    """Train everything and save the pipeline to `out`; returns what was done (for the README).

    With `vae_from` (a saved toy model), its VAE is taken as it is and only the UNet and text encoder
    are trained: the latent space, and every model that shares it, stays the same."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(2)
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = toy.make_tokenizer()
    if vae_from is not None:
        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", dtype=torch.float32).eval().requires_grad_(False)
        scale = vae.config.scaling_factor
    else:
        vae, scale = train_vae(config, work, tick)
        vae.register_to_config(scaling_factor=scale)
    latents, captions = encode_dataset(config, vae, scale, work, tick, config.object_counts)
    unet, text_encoder = train_unet(config, latents, captions, tokenizer, work, tick)
    if config.layout_steps:
        pairs = swaps(config, vae, scale, work, tick)
        # Phase 3b is never grounded: the grounding belongs to the layout phases on a saved model (7, 8).
        unet, text_encoder = tune_layout(replace(config, grounding=0.0), unet, text_encoder, tokenizer, latents,
                                         captions, pairs, work, tick)
    if vae_from is None:
        vae = finetune_decoder(config, vae, work, tick)
    pipe = toy.assemble(vae, unet, text_encoder, tokenizer)
    toy.save(pipe, out)
    if config.decoder_mse_steps and vae_from is None:
        tune_decoder(out, work, config, tick)
    if config.plain_decoder_steps and vae_from is None:
        # Its own seed: phase 5's batches again would add nothing new.
        tune_decoder(out, work, replace(config, decoder_mse_steps=config.plain_decoder_steps,
                                        decoder_plain_fraction=config.plain_decoder_fraction, seed=config.seed + 1), tick)
    relayout_seed = config.seed + 1 if config.relayout_seed is None else config.relayout_seed
    if config.relayout_steps:
        # Fresh scenes and swaps (the next seed; their own folder, so the earlier phases' caches stay):
        # the layout diagnostic gained its margin here, not from a longer phase 3b (samples/toy-sd/v3.md).
        tune_saved_layout(out, work / "phase7", replace(config, layout_steps=config.relayout_steps, seed=relayout_seed,
                                                        reshape_batch=0), tick)
    if config.reshape_layout_steps:
        tune_saved_layout(out, work / "phase8", replace(config, layout_steps=config.reshape_layout_steps,
                                                        seed=relayout_seed + 1), tick)
    return {"config": asdict(config), "scaling_factor": scale, "vae_from": str(vae_from) if vae_from else None}


def finetune(source: str | Path, out: Path, *, steps: int = 300, seed: int = 1, batch: int = 32, lr: float = 2e-4,
             scenes: int = 2048, tick=None) -> dict:
    """A fine-tuned copy of a toy model: its UNet trained `steps` more steps on freshly drawn scenes
    (seeded by `seed`, not the original data), same loss as `train_unet`; VAE and text encoder kept.

    Reproducible from (source, steps, seed); used to check that SPM adapters transfer to fine-tunes.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(source), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    vae, unet, tokenizer, text_encoder = pipe.vae, pipe.unet, pipe.tokenizer, pipe.text_encoder
    scale = vae.config.scaling_factor
    base = 10**9 + seed * 10**6  # scenes the original training never drew
    latents, captions = _encode_scenes(vae, scale, lambda a, b: [make_scene(base + i) for i in range(a, b)], scenes)
    abar = _sd_alphas_cumprod()
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7 * step + 5)
        idx = torch.randint(0, len(captions), (batch,), generator=gen)
        texts = [captions[i] if torch.rand(1, generator=gen) >= 0.1 else "" for i in idx.tolist()]
        with torch.no_grad():
            emb = _embed(text_encoder, tokenizer, texts)
        t, eps, ab, x = _noised(abar, gen, latents[idx])
        loss = _min_snr_loss(unet(x, t, encoder_hidden_states=emb).sample, eps, ab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if tick is not None:
            tick("finetune", step + 1, steps, float(loss))
    unet.eval().requires_grad_(False)
    toy.save(pipe, out)
    with torch.no_grad():
        original = StableDiffusionPipeline.from_pretrained(str(source)).unet.parameters()
        changed = float(sum((p.float() - q.float()).pow(2).sum() for p, q in zip(unet.parameters(), original)) ** 0.5)
    return {"source": str(source), "steps": steps, "seed": seed, "lr": lr, "batch": batch, "weight_change_l2": changed}
