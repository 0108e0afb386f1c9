"""How good the toy model is, by the checker: prompt following, VAE and DDIM round trips."""

from __future__ import annotations

import numpy as np
import torch

from diffedit.engines import Run

from diffedit.inversion import get_engine
from diffedit.families import Family
from diffedit.images import psnr, to_pil
from diffedit.jobs import generate_images
from diffedit.denoiser import branch_denoiser
from diffedit.models import load_model
from diffedit.toy.checker import check
from diffedit.toy.shapes import BACKGROUNDS, COLOURS, SHAPES, Obj, caption, make_scene
from lab.toy.train import photo_sources, to_pixels


def prompt_set(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n seeded single-object prompts: (prompt, shape, colour)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        background = (list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],)
        out.append((caption([Obj(shape, colour, (0, 0), 1)], background), shape, colour))
    return out


def judge(image: np.ndarray, shape: str | None, colour: str | None) -> tuple[bool, bool]:
    """(shape right, colour right) for the largest object the checker finds."""
    found = check(image)
    if not found:
        return False, False
    return shape is None or found[0].shape == shape, colour is None or found[0].colour == colour


def generate_batch(model: Family, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
                   size: int = 64) -> list[np.ndarray]:
    """Seeded images of `prompts` in one batch, sampled as `diffedit generate` does (consistency steps
    on latent-consistency models)."""
    done = generate_images(model, prompts, seeds, steps=steps, guidance_scale=guidance_scale, width=size,
                           height=size)
    return [np.asarray(image) for image, _ in done]


def prompt_following(model: Family, n: int, steps: int, guidance_scale: float, batch: int = 50,
                     seed: int = 0) -> dict:
    """Checker scores (% right shape, colour, both) of images of `n` seeded prompts (`prompt_set`)."""
    prompts = prompt_set(n, seed)
    shape_ok = colour_ok = both = 0
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        images = generate_batch(model, [p for p, _, _ in chunk], list(range(start, start + len(chunk))),
                                steps, guidance_scale)
        for image, (_, shape, colour) in zip(images, chunk):
            s, c = judge(image, shape, colour)
            shape_ok, colour_ok, both = shape_ok + s, colour_ok + c, both + (s and c)
    return {"shape_pct": 100 * shape_ok / n, "colour_pct": 100 * colour_ok / n, "both_pct": 100 * both / n}


@torch.inference_mode()
def vae_psnr(model: Family, images: list[np.ndarray]) -> float:
    x = to_pixels(np.stack(images)).to(model.device)
    back = model.decode(model.encode_image(x))
    return float(np.mean([psnr(to_pil(b), img) for b, img in zip(back, images)]))


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
    engine, values = get_engine("ddim"), []
    for i in range(scenes):
        scene = make_scene(10**8 + i)
        z0 = model.encode_image(to_pixels(scene.image[None]).to(model.device))
        denoise = branch_denoiser(model, scene.caption, 1.0, 64, 64)
        run = Run(model, model.schedule(steps, 64, 64), denoise, denoise, engine.Params())
        z = engine.edit(run, engine.invert(run, z0))
        values.append(psnr(to_pil(model.decode(z)), scene.image))
    return float(np.mean(values))


def report(model_path: str, n: int = 200, steps: int = 50, guidance_scale: float = 5.0) -> dict:
    model = load_model(model_path, device="cpu")
    torch.manual_seed(0)
    result = {"model": model_path, "prompts": n, "steps": steps, "guidance_scale": guidance_scale}
    result.update(prompt_following(model, n, steps, guidance_scale))
    result["vae_psnr_shapes"] = vae_psnr(model, [make_scene(10**8 + i).image for i in range(100)])
    result["vae_psnr_photos"] = vae_psnr(model, photos_64())
    result["ddim_round_trip_psnr"] = ddim_round_trip_psnr(model)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


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
