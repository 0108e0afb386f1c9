"""How good the toy model is, by the checker: prompt following, VAE and DDIM round trips."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
from PIL import Image

from diffedit.denoiser import branch_denoiser, prompt_denoiser_for
from diffedit.editing.attention import AttentionControl, Controller
from diffedit.families import Family
from diffedit.images import psnr, to_pil
from diffedit.jobs import generate_images, invert_image, reconstruct_record
from diffedit.models import load_model
from diffedit.plan import plan_job
from diffedit.sampling import invert, step
from diffedit.toy.checker import border_medians, check
from diffedit.toy.shapes import BACKGROUNDS, COLOURS, SHAPES, Obj, caption, make_scene, user_caption
from lab.toy.train import (
    _noised,
    _sd_alphas_cumprod,
    _token_ids,
    inside_share,
    object_token_masks,
    photo_sources,
    to_pixels,
)


def prompt_set(n: int, seed: int = 0, forms: str = "canonical") -> list[tuple[str, str, str]]:
    """n seeded single-object prompts: (prompt, shape, colour). `forms="user"` writes each as people
    type it (`user_caption`: "red circle", "a red circle", "a red circle on a grey background", ...)."""
    rng = np.random.default_rng(seed)
    forms_rng = np.random.default_rng([seed, 1])
    out = []
    for _ in range(n):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        background = (list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],)
        text = caption([Obj(shape, colour, (0, 0), 1)], background)
        out.append((user_caption(text, forms_rng) if forms == "user" else text, shape, colour))
    return out


def judge(image: np.ndarray, shape: str | None, colour: str | None) -> tuple[bool, bool]:
    """(shape right, colour right) for the largest object the checker finds."""
    found = check(image)
    if not found:
        return False, False
    return shape is None or found[0].shape == shape, colour is None or found[0].colour == colour


def palette_colour(image: np.ndarray, threshold: float = 60.0) -> str | None:
    """The object colour without the checker: the palette colour that most pixels far from both border
    colours (top and bottom half, for two-tone backgrounds) are nearest to; None if no such pixels."""
    img = image.astype(np.float32)
    borders = border_medians(img)
    far = np.all([np.linalg.norm(img - b, axis=-1) > threshold for b in borders], axis=0)
    if far.sum() < 12:
        return None
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], np.float32)
    nearest = np.linalg.norm(img[far][:, None] - palette[None], axis=-1).argmin(1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def generate_batch(model: Family, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
                   size: int = 64) -> list[np.ndarray]:
    """Seeded images of `prompts` in one batch, sampled as `diffedit generate` does (consistency steps
    on latent-consistency models)."""
    done = generate_images(model, prompts, seeds, steps=steps, guidance_scale=guidance_scale, width=size,
                           height=size)
    return [np.asarray(image) for image, _ in done]


def seeded_images(model: Family, prompts: list[tuple], steps: int, guidance_scale: float, batch: int):
    """(image, item) for each item of `prompts` (its prompt text first), the i-th drawn from seed i,
    generated `batch` at a time."""
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        images = generate_batch(model, [item[0] for item in chunk], list(range(start, start + len(chunk))), steps,
                                guidance_scale)
        yield from zip(images, chunk)


def prompt_following(model: Family, n: int, steps: int, guidance_scale: float, batch: int = 50,
                     seed: int = 0, forms: str = "canonical") -> dict:
    """Checker scores (% right shape, colour, both) of images of `n` seeded prompts (`prompt_set`),
    and the % whose palette colour (`palette_colour`, no checker) is the asked one."""
    prompts = prompt_set(n, seed, forms)
    shape_ok = colour_ok = both = palette_ok = 0
    for image, (_, shape, colour) in seeded_images(model, prompts, steps, guidance_scale, batch):
        s, c = judge(image, shape, colour)
        shape_ok, colour_ok, both = shape_ok + s, colour_ok + c, both + (s and c)
        palette_ok += palette_colour(image) == colour
    return {"shape_pct": 100 * shape_ok / n, "colour_pct": 100 * colour_ok / n, "both_pct": 100 * both / n,
            "palette_colour_pct": 100 * palette_ok / n}


def pair_prompt_set(n: int, seed: int = 0, forms: str = "canonical") -> list[tuple[str, list[Obj]]]:
    """n seeded two-object prompts with two colours and two shapes, so a colour drawn on the wrong
    object shows: (prompt, objects), captions of the world's own scenes (seeds apart from ShapesBench's
    and the held-out tasks'), `forms="user"` as people type them."""
    forms_rng = np.random.default_rng([seed, 2])
    out, scene_seed = [], 3 * 10**6 + seed * 10**5
    while len(out) < n:
        scene, scene_seed = make_scene(scene_seed, n_objects=2, two_tone=0.0), scene_seed + 1
        a, b = scene.objects
        if a.colour != b.colour and a.shape != b.shape:
            out.append((user_caption(scene.caption, forms_rng) if forms == "user" else scene.caption, scene.objects))
    return out


def pair_scores(image: np.ndarray, objects: list[Obj]) -> tuple[bool, bool, bool]:
    """(both objects drawn as asked, each shape drawn in the other's colour, both shapes and both
    colours drawn) for an image of a two-object prompt, by the checker."""
    a, b = objects
    found = {(d.shape, d.colour) for d in check(image)}
    parts = {a.shape, b.shape} <= {f[0] for f in found} and {a.colour, b.colour} <= {f[1] for f in found}
    return ({(a.shape, a.colour), (b.shape, b.colour)} <= found,
            {(a.shape, b.colour), (b.shape, a.colour)} <= found, parts)


def pair_following(model: Family, n: int, steps: int, guidance_scale: float, batch: int = 50, seed: int = 0,
                   forms: str = "canonical") -> dict:
    """Attribute binding on `n` two-object prompts (`pair_prompt_set`), by the checker: % with both
    asked objects (shape and colour) drawn; % with each shape drawn in the other's colour (swapped);
    % with both colours and both shapes somewhere, whatever goes with what."""
    prompts = pair_prompt_set(n, seed, forms)
    both = swapped = parts = 0
    for image, (_, objects) in seeded_images(model, prompts, steps, guidance_scale, batch):
        scores = pair_scores(image, objects)
        both, swapped, parts = both + scores[0], swapped + scores[1], parts + scores[2]
    return {"pair_both_pct": 100 * both / n, "pair_swapped_pct": 100 * swapped / n,
            "pair_parts_pct": 100 * parts / n}


@torch.inference_mode()
def vae_psnr(model: Family, images: list[np.ndarray]) -> float:
    x = to_pixels(np.stack(images)).to(model.device)
    back = model.decode(model.encode_image(x))
    return float(np.mean([psnr(to_pil(b), img) for b, img in zip(back, images)]))


# Plain backgrounds a user may put a scene on: the extremes, the world's white, greys, the RGB cube's
# other corners and a few colours between.
PLAIN_PANEL = ((255, 255, 255), (0, 0, 0), (245, 245, 245), (64, 64, 64), (128, 128, 128), (192, 192, 192),
               (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
               (200, 60, 90), (0, 160, 0), (30, 200, 220), (250, 150, 40))


@torch.inference_mode()
def plain_background_error(model: Family, colours=PLAIN_PANEL, scenes: int = 8) -> dict:
    """Largest error, in levels, of the VAE round trip's background (mean over the background pixels, per
    channel) for scenes put on each plain colour; by colour."""
    out = {}
    for colour in colours:
        errors = []
        for i in range(scenes):
            scene = make_scene(10**8 + i)
            background = ~np.any(scene.masks, 0)
            image = scene.image.copy()
            image[background] = colour
            back = np.asarray(to_pil(model.decode(model.encode_image(to_pixels(image[None]).to(model.device)))))
            errors.append(float(np.abs(back[background].astype(np.float32).mean(0) - np.array(colour)).max()))
        out["-".join(map(str, colour))] = round(max(errors), 2)
    return out


def photos_64() -> list[np.ndarray]:
    """scikit-image's colour sample photos, centre-cropped square and resized to 64x64."""
    import cv2

    out = []
    for img in photo_sources()[:8]:
        h, w = img.shape[:2]
        side = min(h, w)
        crop = img[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        out.append(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA))
    return out


def ddim_round_trip_psnr(model: Family, scenes: int = 12, steps: int = 50) -> float:
    plan, values = plan_job(model, engine="ddim", steps=steps, inversion_guidance_scale=1.0), []
    for i in range(scenes):
        scene = make_scene(10**8 + i)
        record, _ = invert_image(model, Image.fromarray(scene.image), plan, prompt=scene.caption, check=False)
        image, _ = reconstruct_record(model, record)
        values.append(psnr(image, scene.image))
    return float(np.mean(values))


def report(model_path: str, n: int = 200, steps: int = 50, guidance_scale: float = 5.0) -> dict:
    model = load_model(model_path, device="cpu")
    torch.manual_seed(0)
    result = {"model": model_path, "prompts": n, "steps": steps, "guidance_scale": guidance_scale}
    result.update(prompt_following(model, n, steps, guidance_scale))
    user = prompt_following(model, n, steps, guidance_scale, forms="user")
    result.update({f"user_{k}": v for k, v in user.items()})
    result.update(pair_following(model, n // 2, steps, guidance_scale))
    pairs_typed = pair_following(model, n // 2, steps, guidance_scale, forms="user")
    result.update({f"user_{k}": v for k, v in pairs_typed.items()})
    vae = vae_report(model)
    result.update(vae_psnr_shapes=vae["shapes_psnr"], vae_psnr_photos=vae["photos_psnr"])
    result["ddim_round_trip_psnr"] = ddim_round_trip_psnr(model)
    result["word_grounding_pct"] = word_grounding(model)
    result["plain_background_error_levels"] = vae["plain_background_error_levels"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def vae_report(model: Family, quick: bool = False) -> dict:
    """The VAE's bars (the model's round trip: its `decoder_inversion` steps included): PSNR on 100
    world scenes and on the photos, the plain-background panel (worst, mean, colours within 2 levels),
    and the time of one 64x64 encode against the encoder's alone (median of 5, side by side). `quick`:
    10 scenes and 1 per plain colour instead of 100 and 8 (a look, not the measure)."""
    panel = plain_background_error(model, scenes=1 if quick else 8)
    errors = list(panel.values())
    x = to_pixels(make_scene(10**8).image[None]).to(model.device)
    steps, seconds = model.decoder_inversion, {}
    for label, n in (("encoder", 0), ("encode", steps)):
        model.decoder_inversion, times = n, []
        for _ in range(5):
            started = time.perf_counter()
            model.encode_image(x)
            times.append(time.perf_counter() - started)
        seconds[label] = statistics.median(times)
    model.decoder_inversion = steps
    return {"decoder_inversion": steps,
            "shapes_psnr": round(vae_psnr(model, [make_scene(10**8 + i).image for i in range(10 if quick else 100)]), 2),
            "photos_psnr": round(vae_psnr(model, photos_64()), 2),
            "plain_worst": max(errors), "plain_mean": round(float(np.mean(errors)), 2),
            "plain_within_2": sum(e <= 2 for e in errors), "plain_colours": len(errors),
            "encode_seconds": round(seconds["encode"], 4),
            "encode_vs_encoder": round(seconds["encode"] / seconds["encoder"], 1),
            "plain_background_error_levels": panel}


def vae_markdown(rows: list[dict]) -> str:
    head = ["| model | decoder inversion (steps) | shapes (100, dB) | photos (8, dB) | plain colours within 2 levels "
            "| plain worst / mean (levels) | s / 64-px encode | × the encoder alone |",
            "|---|---|---|---|---|---|---|---|"]
    # a --quick row counts 10 scenes and 1 per colour: its model cell says so
    body = [f"| {r['model']}{' (quick)' if r.get('quick') else ''} | {r['decoder_inversion']} | {r['shapes_psnr']:.2f} | {r['photos_psnr']:.2f} | "
            f"{r['plain_within_2']} of {r['plain_colours']} | {r['plain_worst']:.2f} / {r['plain_mean']:.2f} | "
            f"{r['encode_seconds']:.3f} | {r['encode_vs_encoder']:.1f} |" for r in rows]
    colours = list(rows[0]["plain_background_error_levels"])
    panel = ["", "| decoder inversion | " + " | ".join(colours) + " |", "|---" * (len(colours) + 1) + "|"]
    panel += [f"| {r['decoder_inversion']} | " + " | ".join(f"{v:.2f}" for v in r["plain_background_error_levels"].values())
              + " |" for r in rows]
    return "\n".join(head + body + panel)


def fk_success(model: Family, n: int = 50, particles: int = 4, steps: int = 50, guidance_scale: float = 5.0,
               lam: float = 10.0) -> dict:
    """Checker success (shape and colour right) with FK steering on the checker reward, vs K = 1.

    Both use the same stochastic sampler (eta = 1) and seeds; only the particles and resampling differ.
    """
    from diffedit.guidance.fk import FKConfig
    from diffedit.jobs import generate_image

    prompts = prompt_set(n, seed=1)
    wins = {1: 0, particles: 0}
    for k in wins:
        fk = FKConfig(particles=k, lam=lam, every=5) if k > 1 else None
        for seed, (prompt, shape, colour) in enumerate(prompts):
            image, _ = generate_image(model, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                      width=64, height=64, eta=1.0, fk=fk, reward="checker")
            wins[k] += all(judge(np.asarray(image), shape, colour))
    return {"prompts": n, "particles": particles, "success_k1_pct": 100 * wins[1] / n,
            f"success_k{particles}_pct": 100 * wins[particles] / n}


class CrossMaps(Controller):
    """Reads every cross-attention layer's maps (a plain forward: every row is conditional)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def wants_maps(self, call):
        return call.cross

    def maps(self, call, probs):
        self.seen.append(probs)
        return probs


@torch.inference_mode()
def word_grounding(model: Family, scenes: int = 64) -> float:
    """% of each object word's cross-attention mass that falls inside its object (its colour's and its
    shape's word; mean over the words, then over the UNet's cross-attention layers), on `scenes` seeded
    scenes with their captions at seeded noise levels. Maps spread evenly score each object's share of
    the image; Stable Diffusion's object words are localised, which prompt-to-prompt relies on."""
    drawn = [make_scene(3 * 10**8 + i) for i in range(scenes)]  # apart from every training and test scene
    z0 = model.encode_image(to_pixels(np.stack([s.image for s in drawn])).to(model.device))
    t, _, _, x = _noised(_sd_alphas_cumprod(), torch.Generator().manual_seed(0), z0.float().cpu())  # training's draw
    pipe, texts = model.pipe, [s.caption for s in drawn]
    ids = _token_ids(pipe.tokenizer, texts).to(model.device)
    maps = CrossMaps()
    with AttentionControl(pipe.unet, maps):
        pipe.unet(x.to(z0), t.to(model.device), encoder_hidden_states=pipe.text_encoder(ids)[0])
    token_masks = object_token_masks(pipe.tokenizer, texts, drawn).to(z0)
    layers = [share[grounded].mean() for share, grounded in (inside_share(p.float(), token_masks.float()) for p in maps.seen)]
    return 100 * float(torch.stack(layers).mean())


class SourceMaps(Controller):
    """Every attention map of every target row (all branches, self and cross, all steps) replaced by
    the source row's: what is left to the target is its own values, its text and its convolutions."""

    def wants_maps(self, call):
        return not call.joint

    def maps(self, call, probs):
        chunks = probs.unflatten(0, (len(call.branches), -1))  # [branch, item, heads, queries, keys], a view
        chunks[:, 1:] = chunks[:, :1]
        return probs


def _source_tokens_but_the_word(model: Family, batch, rows: list[str]) -> None:
    """In place: the target row's encoding takes the source row's at every token but the ones whose
    ids differ (the swapped word's own). A token that sees the words before it (v4's encoder) changes
    when the word before it does; this leaves the word as the only change."""
    ids = _token_ids(model.pipe.tokenizer, rows[:2])
    same = (ids[0] == ids[1]).to(model.device)
    text = batch.cond.tensors["text"]  # the branches' rows one after another (`Denoiser.cond`)
    source = batch.branches.index("cond") * len(rows)
    text[source + 1, same] = text[source, same]


@torch.inference_mode()
def layout_in_attention(model: Family, tasks: list[dict], steps: int = 50, guidance_scale: float = 7.5,
                        tolerance: float = 2.0, word_only: bool = False) -> dict:
    """The layout-in-attention diagnostic: each recolour task's source is DDIM-inverted and regenerated
    as source, target and no-edit control side by side, the source pinned to its inversion (Direct
    Inversion's exact branch), target and control taking every attention map from it (`SourceMaps`).
    On a model whose layout follows its attention maps, every object stays where it was: % of tasks
    whose every object's centre (by the checker) is within `tolerance` px of the source's (`kept_pct`).

    The control has the source's own prompt, so only the word differs between it and the target. It
    separates what the word moves (`kept_vs_control_pct`: the target's objects against the control's)
    from what the regeneration moves without any edit (`control_kept_pct`: guidance on a trajectory
    inverted without it redraws objects too). `recoloured_pct`: % of edits that ShapesBench judges done
    (the asked colour, every object in place within 4 px). `word_only`: the target's text differs from
    the source's only at the swapped word's token (`_source_tokens_but_the_word`)."""
    from lab.toy.bench import judge, source_scene

    def nearest(found, point):  # the centre of the detection closest to point; None if nothing was found
        return min((d.centroid for d in found), key=lambda c: math.dist(c, point), default=None)

    def shift(a, b):
        return math.inf if a is None or b is None else math.dist(a, b)

    moved, control_moved, word_moved, recoloured = [], [], [], []
    for task in tasks:
        scene = source_scene(task)
        z0 = model.encode_image(to_pixels(scene.image[None]).to(model.device))
        schedule = model.schedule(steps, *scene.image.shape[:2])
        source = branch_denoiser(model, task["source_prompt"], 1.0, *scene.image.shape[:2])
        trajectory = invert(source, z0, schedule)[::-1]
        rows = [task["source_prompt"], task["target_prompt"], task["source_prompt"]]
        batch = prompt_denoiser_for(model, rows, guidance_scale, *scene.image.shape[:2], controller=SourceMaps())
        if word_only:
            _source_tokens_but_the_word(model, batch, rows)
        x = trajectory[0].repeat(3, 1, 1, 1)
        for i in range(steps):
            x0, eps = batch(x, schedule, i)
            x = step(x0, eps, schedule.a[i + 1], schedule.s[i + 1])
            x[:1] = trajectory[i + 1]
        edited_image, control_image = (np.asarray(to_pil(image)) for image in model.decode(x[1:]))
        recoloured.append(judge(task, edited_image)["success"])
        edited, control = check(edited_image), check(control_image)
        centres = [o.center for o in scene.objects]
        in_edit, in_control = [nearest(edited, c) for c in centres], [nearest(control, c) for c in centres]
        moved.append(max(map(shift, in_edit, centres)))
        control_moved.append(max(map(shift, in_control, centres)))
        word_moved.append(max(map(shift, in_edit, in_control)))

    def pct(shifts):
        return 100 * sum(m <= tolerance for m in shifts) / len(tasks)

    return {"tasks": len(tasks), "steps": steps, "guidance_scale": guidance_scale, "word_only": word_only, "kept_pct": pct(moved), "control_kept_pct": pct(control_moved),
            "kept_vs_control_pct": pct(word_moved), "recoloured_pct": 100 * sum(recoloured) / len(tasks),
            "median_shift_px": float(np.median(moved)) if moved else None,
            "shifts_px": [round(float(m), 2) for m in moved],
            "control_shifts_px": [round(float(m), 2) for m in control_moved],
            "shifts_vs_control_px": [round(float(m), 2) for m in word_moved]}
