"""What each command does, without the command line: invert, reconstruct, edit, generate.

Each job returns its output (record or image) and a result dict with the stable field names of
docs/design.md ("Results") (`engine`, `steps`, `nfe`, `seconds`, `psnr`, `latent_max_abs`, ...). The CLI and
`batch` only parse options, call these, and write what they return.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from diffedit import __version__
from diffedit.denoiser import prompt_denoiser_for
from diffedit.editing.word_mask import mask_from_prompt
from diffedit.engines import Run, split_tensors, stack_tensors
from diffedit.errors import DiffeditError, UsageError
from diffedit.families import Family
from diffedit.guidance import GuidanceSpec
from diffedit.guidance.fk import FKConfig, load_reward, steer
from diffedit.images import Fit, load_image, load_mask, psnr, size_dict, to_pil, to_tensor
from diffedit.masks import EditMask, MaskOptions
from diffedit.plan import Plan, plan_of_record
from diffedit.records import Record, model_meta
from diffedit.sampling import Callback, sample


@dataclass
class ImageInput:
    """How an input image is read and brought to a size the model accepts (and back: see `Fit`)."""

    fit: str = "pad"  # pad | resize | crop
    alpha: str = "composite"  # composite | refuse


@dataclass(frozen=True)
class MaskInput:
    """Where an edit may change the image: a mask (file or image, white = edit, of the input's size)
    or words of the source prompt whose cross-attention finds the region; how the mask is shaped;
    whether the input's own pixels are pasted back outside it."""

    file: str | Image.Image | None = None
    words: str | None = None
    options: MaskOptions = MaskOptions()
    paste_back: bool = True

    def name(self) -> str:
        if self.words is not None:
            return f"--mask-from-prompt {self.words!r}"
        return self.file if isinstance(self.file, str) else "mask"


def read_image(model: Family, source: str | Image.Image, how: ImageInput) -> tuple[Image.Image, Fit]:
    """A file (or "-", or an image already in memory) as read, and how it fits the model's canvas."""
    img = source.convert("RGB") if isinstance(source, Image.Image) else load_image(source, alpha=how.alpha)
    return img, Fit.of(img.size, model.multiple, how.fit)


def sizes(fit: Fit) -> dict:
    """A result's `size` (of the input and every output) and, when the model worked on another one,
    its `canvas` and the --fit policy that made it."""
    if not fit.changed:
        return {"size": size_dict(fit.size)}
    return {"size": size_dict(fit.size), "canvas": size_dict(fit.canvas), "fit": fit.policy}


def read_edit_mask(model: Family, img: Image.Image, fit: Fit, mask: MaskInput, prompt: str, seed: int) -> EditMask:
    """The edit region of an image (on the model's canvas, `img`): its mask file (of the image's own
    size) brought to the canvas as the image was, or found from words of `prompt`; then dilated,
    inverted and feathered as asked."""
    if (mask.file is None) == (mask.words is None):
        raise UsageError("give either a mask file or words of the prompt to find the region by")
    if mask.file is not None:
        fitted = fit.apply(load_mask(mask.file, fit.size), Image.Resampling.NEAREST)
        return EditMask.from_image(fitted, mask.options, mask.name(), model.vae_scale)
    found = mask_from_prompt(model, to_tensor(img).to(model.device), prompt, mask.words, seed)
    return EditMask.from_image(Image.fromarray(found.numpy().astype(np.uint8) * 255), mask.options, mask.name(),
                               model.vae_scale)


def word_mask(model: Family, source: str | Image.Image, prompt: str, mask: MaskInput, how: ImageInput,
              seed: int = 0) -> tuple[Image.Image, Image.Image, dict]:
    """(mask, the input with the mask tinted over it, result), both at the input's own size, for the
    region where `mask.words` of `prompt` attend."""
    started = time.perf_counter()
    raw, fit = read_image(model, source, how)
    img = fit.apply(raw)
    found = read_edit_mask(model, img, fit, mask, prompt, seed)
    hard = Image.fromarray(((found.weights > 0) * 255).astype(np.uint8), "L")
    result = {"words": mask.words, "edited_fraction": found.edited_fraction, **sizes(fit),
              "seconds": time.perf_counter() - started}
    return fit.undo(hard, Image.Resampling.NEAREST), fit.undo(found.overlay(img)), result


def record_fit(record: Record) -> Fit:
    """How the record's image was brought to the model's canvas (its outputs are undone the same way)."""
    meta = record.meta
    size, canvas = meta["size"], meta["canvas"]
    return Fit((size["width"], size["height"]), (canvas["width"], canvas["height"]),
               (meta.get("input") or {}).get("fit", "resize"))


def record_image(model: Family, record: Record) -> Image.Image:
    """The image a record was inverted from, on the model's canvas: its own pixels when it keeps them,
    else its latent decoded."""
    if "pixels" in record.tensors:
        return Image.fromarray(record.tensors["pixels"].numpy())
    return to_pil(model.decode(record.tensors["latent"].to(model.device)))


def mask_for_record(model: Family, record: Record, mask: MaskInput) -> EditMask:
    """A new edit mask for a record's image (a mask file must have the size of the inverted image)."""
    return read_edit_mask(model, record_image(model, record), record_fit(record), mask, record.meta["source_prompt"],
                          record.meta["seed"])


def show_mask(model: Family, record: Record, mask: EditMask | None) -> Image.Image:
    """The record's image with the edit mask tinted over it, at the image's own size (a usage error
    without a mask)."""
    if mask is None:
        raise UsageError("--show-mask: the record has no edit mask")
    return record_fit(record).undo(mask.overlay(record_image(model, record)))


def record_mask(record: Record) -> EditMask | None:
    """The edit mask a record was inverted with (None: it has none)."""
    levels = record.tensors.get("mask")
    return None if levels is None else EditMask.of_levels(levels.numpy())


def _psnr_vs(model: Family, latent: torch.Tensor, fit: Fit, reference: Image.Image) -> float:
    """PSNR of a latent's picture, at the image's own size, against `reference` (the input as read)."""
    return psnr(fit.undo(to_pil(model.decode(latent))), reference)


def _run(model: Family, plan: Plan, pairs: list[tuple[str, str]], seeds: list[int], height: int, width: int,
         callback: Callback | None, target_guidance: GuidanceSpec | None = None, mask: EditMask | None = None) -> Run:
    """The engine's run of a plan over images with these (source, target) prompts and seeds: the
    schedule and the source and target denoisers (one and the same when every target is its source
    at the source's scale: a reconstruction)."""
    schedule = plan.engine.schedule(model, plan.steps, height, width, plan.params)
    negative = plan.negative_prompt
    sources, targets = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    src = prompt_denoiser_for(model, list(sources), plan.inversion_scale, height, width, negative, plan.guidance)
    same = targets == sources and plan.edit_scale == plan.inversion_scale and target_guidance is None
    tgt = src if same else prompt_denoiser_for(model, list(targets), plan.edit_scale, height, width, negative,
                                               target_guidance or plan.guidance)
    pair = lambda prompts, controller, scales=None: prompt_denoiser_for(  # noqa: E731
        model, prompts, scales or plan.edit_scale, height, width, negative, plan.guidance, controller)
    region = None if mask is None else mask.latent(model.latent_shape(1, height, width)[-2:], model.device)
    return Run(model, schedule, src, tgt, plan.params, tuple(seeds), callback, sources, targets,
               (plan.inversion_scale, plan.edit_scale), pair, region=region)


def batches(keys: list) -> list[list[int]]:
    """Indices of equal keys, in order of first appearance: the images that can share one engine run."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


# Tensors a record keeps for the user (paste-back, the mask), not for its engine
RECORD_ONLY = ("mask", "pixels")


def engine_tensors(records: list[Record]) -> dict[str, torch.Tensor]:
    """The records' engine tensors as one batch."""
    return stack_tensors([{k: v for k, v in r.tensors.items() if k not in RECORD_ONLY} for r in records])


def _shared(result: dict, run: Run, images: int) -> dict:
    """Cost fields of a result whose forwards `images` images shared."""
    result.update(nfe=run.nfe, forwards=run.forwards)
    if images > 1:
        result["batched"] = images
    return result


def _stamped(out: list, started: float) -> list:
    """The outputs of a batched job, each result with the batch's seconds (they shared every forward)."""
    seconds = time.perf_counter() - started
    for _, result in out:
        result["seconds"] = seconds
    return out


def invert_image(
    model: Family, source: str | Image.Image, plan: Plan, *, prompt: str = "", image: ImageInput = ImageInput(),
    mask: MaskInput | None = None, check: bool = True, callback: Callback | None = None,
) -> tuple[Record, dict]:
    """Invert an image into a record; with `check`, reconstruct it and measure the error.

    With a `mask` the record keeps the edit mask, the input's pixels (for pasting back) and, for
    engines that need it, the source's inversion path: later edits of the record are local."""
    return invert_images(model, [source], plan, prompts=[prompt], image=image, mask=mask, check=check,
                         callback=callback)[0]


def invert_images(
    model: Family, sources: list[str | Image.Image], plan: Plan, *, prompts: list[str], seeds: list[int] | None = None,
    image: ImageInput = ImageInput(), mask: MaskInput | None = None, check: bool = True,
    callback: Callback | None = None,
) -> list[tuple[Record, dict]]:
    """Invert images into records, those of one canvas size in one engine run (micro-batching): each
    image's forwards are shared, its noise drawn from its own seed (`seeds`, default the plan's), and
    each is encoded and decoded alone, so every record and result is a lone job's (up to float
    rounding). A `mask` applies to a lone image."""
    started = time.perf_counter()
    seeds = [plan.seed] * len(sources) if seeds is None else list(seeds)
    if mask is not None and len(sources) > 1:
        raise UsageError("a masked inversion runs one image at a time")
    read = [read_image(model, source, image) for source in sources]
    imgs = [fit.apply(raw) for raw, fit in read]
    edit_mask = None if mask is None else read_edit_mask(model, imgs[0], read[0][1], mask, prompts[0], seeds[0])
    reconstruction = replace(plan, edit_scale=plan.inversion_scale)
    out = [None] * len(sources)
    for group in batches([img.size for img in imgs]):
        width, height = imgs[group[0]].size
        z0 = torch.cat([model.encode_image(to_tensor(imgs[k])) for k in group])
        run = _run(model, reconstruction, [(prompts[k], prompts[k]) for k in group], [seeds[k] for k in group],
                   height, width, callback, mask=edit_mask)
        tensors = {**plan.engine.invert(run, z0), "latent": z0}
        inversion_nfe = run.nfe  # of the total, what inverting cost (the check samples back)
        z_rec = plan.engine.edit(run, tensors) if check else None
        for j, (k, part) in enumerate(zip(group, split_tensors(tensors, len(group)))):
            (raw, fit), img, source = read[k], imgs[k], sources[k]
            if edit_mask is not None:
                part.update(mask=torch.from_numpy(edit_mask.levels()), pixels=torch.from_numpy(np.array(img)))
            meta = {
                "model": model_meta(model),
                "engine": plan.engine_meta,
                "source_prompt": prompts[k],
                "negative_prompt": plan.negative_prompt,
                "guidance_scale": plan.inversion_scale,
                "guidance": plan.guidance.to_dict(),
                "steps": plan.steps,
                "seed": seeds[k],
                "size": size_dict(fit.size),  # of the input, and of every image made from the record
                "canvas": size_dict(fit.canvas),  # what the model works on: the latent's, in pixels
                "image": source if isinstance(source, str) else "<memory>",
                # what `reconstruct` compares with: the input as the network saw it (after --fit), by content
                "input": {"sha256": pixels_digest(img), "fit": image.fit, "alpha": image.alpha},
            }
            if mask is not None:
                meta["mask"] = {"source": mask.name(), **asdict(mask.options),
                                "edited_fraction": edit_mask.edited_fraction}
            result = {"engine": plan.engine.name, "steps": plan.steps, "seed": seeds[k], **sizes(fit),
                      "defaults": plan.defaults}
            if check:
                z_k = z_rec[j : j + 1]
                result.update(
                    inversion_nfe=inversion_nfe,
                    psnr=_psnr_vs(model, z_k, fit, raw),
                    latent_max_abs=float((z_k - z0[j : j + 1]).abs().max()),
                    vae_psnr=_psnr_vs(model, z0[j : j + 1], fit, raw),  # the ceiling any inversion can reach
                )
            out[k] = (Record(part, meta), _shared(result, run, len(group)))
    return _stamped(out, started)


def pixels_digest(img: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size: the same picture gives the same digest in any file format."""
    import hashlib

    rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}|".encode() + rgb.tobytes()).hexdigest()


def record_input(model: Family, record: Record, source: str | Image.Image) -> Image.Image:
    """The record's input image read from `source` (at its own size); a DiffeditError when it is not the
    image that was inverted (its pixels, brought to the canvas by the same --fit, differ)."""
    how = record.meta.get("input") or {}
    img, fit = read_image(model, source, ImageInput(fit=how.get("fit", "resize"), alpha=how.get("alpha", "composite")))
    made, fitted = record_fit(record), fit.apply(img)
    reference = img if img.size == made.size else fitted  # a format-2 record's size is its canvas
    if (reference.size != made.size or fitted.size != made.canvas
            or how.get("sha256") not in (None, pixels_digest(fitted))):
        name = source if isinstance(source, str) else "the image"
        raise DiffeditError(f"{name}: not the image {record.name} was inverted from (its pixels differ)")
    return reference


def reconstruct_record(model: Family, record: Record, *, reference: Image.Image | None = None,
                       callback: Callback | None = None) -> tuple[Image.Image, dict]:
    """Regenerate the record's image with its own prompt and guidance; report the error.

    `psnr` compares with the input image (`reference`, as `record_input` reads it; else the pixels a
    masked record keeps), `vae_psnr` is the VAE's own round trip of it (the ceiling), `psnr_vs_vae`
    compares with the decoded input latent (all a record alone can tell). The image comes back at the
    input's own size, and all three compare at that size."""
    return reconstruct_records(model, [record], references=[reference], callback=callback)[0]


def reconstruct_records(model: Family, records: list[Record], *, references: list[Image.Image | None] | None = None,
                        callback: Callback | None = None) -> list[tuple[Image.Image, dict]]:
    """`reconstruct_record` of records made with one plan (but for their seeds), those of one canvas size
    in one engine run (micro-batching)."""
    started = time.perf_counter()
    references = references or [None] * len(records)
    plans = [plan_of_record(model, r.meta) for r in records]
    plan = _one_plan(plans, records)
    for r in records:
        check_record(model, r, plan)
    fits = [record_fit(r) for r in records]
    out = [None] * len(records)
    for group in batches([fit.canvas for fit in fits]):
        prompts = [records[k].meta["source_prompt"] for k in group]
        run = _run(model, plan, list(zip(prompts, prompts)), [plans[k].seed for k in group], *_hw(fits[group[0]].canvas),
                   callback)
        z_rec = plan.engine.edit(run, engine_tensors([records[k] for k in group]))
        for j, k in enumerate(group):
            record, fit, reference = records[k], fits[k], references[k]
            z = z_rec[j : j + 1]
            image = fit.undo(to_pil(model.decode(z)))
            z0 = record.tensors["latent"].to(z.device)
            decoded = fit.undo(to_pil(model.decode(z0)))
            if reference is None and "pixels" in record.tensors:
                reference = fit.undo(Image.fromarray(record.tensors["pixels"].numpy()))
            result = {"engine": plan.engine.name, "steps": plan.steps, **sizes(fit),
                      "latent_max_abs": float((z - z0).abs().max())}
            if reference is not None:
                result.update(psnr=psnr(image, reference), vae_psnr=psnr(decoded, reference))
            result["psnr_vs_vae"] = psnr(image, decoded)
            out[k] = (image, _shared(result, run, len(group)))
    return _stamped(out, started)


def _one_plan(plans: list[Plan], records: list[Record]) -> Plan:
    """The plan records share (their seeds aside); a UsageError naming the first record that differs."""
    first = plans[0]
    for plan, record in zip(plans[1:], records[1:]):
        if plan.batch_key != first.batch_key:
            raise UsageError(f"{record.name}: made with other settings than {records[0].name}; they cannot share a batch")
    return first


def _hw(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a (w, h) size, as the samplers take it."""
    return size[1], size[0]


def _steered_edit(model: Family, run: Run, record: Record, fk: FKConfig, reward: str):
    """FK steering of an edit: K particles sampled stochastically from the inverted noise."""
    noise = record.tensors["noise"]
    target = run.targets[0]
    den = run.denoiser_for([target] * fk.particles, scales=[run.scales[1]] * fk.particles)
    latents, rewards, stats = steer(den, run.schedule, tuple(noise.shape), run.seeds[0], load_reward(reward),
                                    target, model.decode, fk, model.device, run.callback, start=noise)
    best = int(torch.nan_to_num(rewards, nan=-math.inf).argmax())
    return latents[best : best + 1], {**stats, "reward": float(rewards[best]), "rewards": rewards.tolist()}


def _check_accelerators(plan: Plan, adaptive_guidance: float | None, deepcache: int | None,
                        fk: FKConfig | None) -> None:
    if (adaptive_guidance is not None or deepcache) and not plan.engine.accelerable:
        raise UsageError(f"--adaptive-guidance/--deepcache would change {plan.engine.name}'s regeneration so that it "
                         "no longer retraces the inversion (exactness lost); they apply to ddim and rf-inversion edits")
    if deepcache and fk is not None and fk.particles > 1:
        raise UsageError("--deepcache is not combined with FK steering")
    if fk is not None and fk.particles > 1 and plan.engine.name != "ddim":
        raise UsageError(f"FK steering in edits samples from the inverted noise: use --engine ddim, not {plan.engine.name}")
    if fk is not None and fk.particles > 1 and plan.params.solver != "ddim":
        raise UsageError(f"FK steering samples stochastically with --solver ddim, not {plan.params.solver}")


def edit_record(model: Family, record: Record, target_prompt: str, plan: Plan, *, callback: Callback | None = None,
                show_attention: bool = False, fk: FKConfig | None = None, reward: str = "saturation",
                adaptive_guidance: float | None = None, deepcache: int | None = None,
                mask: EditMask | None = None, paste_back: bool = True) -> tuple[Image.Image, dict]:
    """Regenerate the record's image under a new prompt with the plan (`plan_of_record(..., edit=True)`).

    With `show_attention`, engines that control attention add `attention_maps` (per target token,
    on the latent grid) and `attention_tokens` to the result. `adaptive_guidance` and `deepcache`
    accelerate the regeneration of engines that allow it (not exact ones: they must retrace).
    A `mask` (else the record's own) keeps the source outside it; with `paste_back` the output there
    is the input's own pixels, blended over the feathered seam.
    """
    started = time.perf_counter()
    _check_accelerators(plan, adaptive_guidance, deepcache, fk)
    check_record(model, record, plan)
    meta = record.meta
    mask = mask if mask is not None else record_mask(record)
    if mask is not None:
        _check_mask(mask, record, fk, paste_back)
    target_guidance = None if adaptive_guidance is None else GuidanceSpec.from_dict(
        {**plan.guidance.to_dict(), "adaptive_threshold": adaptive_guidance})
    fit = record_fit(record)
    run = _run(model, plan, [(meta["source_prompt"], target_prompt)], [plan.seed], *_hw(fit.canvas), callback,
               target_guidance, mask)
    if deepcache:
        from diffedit.deepcache import DeepCache

        run.target.deepcache = DeepCache(model.network, deepcache)
    run.show_attention = show_attention
    result = {"engine": plan.engine.name, "steps": plan.steps, **sizes(fit), "defaults": plan.defaults}
    if fk is not None and fk.particles > 1:
        z, steered = _steered_edit(model, run, record, fk, reward)
        result.update(steered)
    else:
        z = plan.engine.edit(run, engine_tensors([record]))
    out = to_pil(model.decode(z))
    if mask is not None:
        # Outside the mask: the input's own pixels, or without paste-back its VAE round trip. The edited
        # latent equals the input's there, but the decoder's attention would carry the edit across the
        # whole image, so the source latent's own decoding is blended in over the same seam.
        keep = (Image.fromarray(record.tensors["pixels"].numpy()) if paste_back
                else to_pil(model.decode(record.tensors["latent"])))
        out = mask.paste(out, keep)
        result.update(edited_fraction=mask.edited_fraction, paste_back=paste_back)
    out = fit.undo(out)
    result.update(nfe=run.nfe, forwards=run.forwards, seconds=time.perf_counter() - started)
    if deepcache:
        result["full_steps"] = run.target.deepcache.full_steps
    if "attention" in run.extras:
        result.update(attention_maps=run.extras["attention"], attention_tokens=run.extras["tokens"])
    return out, result


def edit_records(model: Family, records: list[Record], targets: list[str], plans: list[Plan], *,
                 callback: Callback | None = None) -> list[tuple[Image.Image, dict]]:
    """`edit_record` of several records under one plan (their seeds aside), in shared forwards
    (micro-batching): one engine run per canvas size, reconstructions (target = source) apart from
    edits, since engines take a shortcut for those. Each image is decoded alone, so every output is
    a lone job's (up to float rounding). Masks, attention previews, FK steering and the accelerators
    run through `edit_record`, one image at a time."""
    started = time.perf_counter()
    plan = _one_plan(plans, records)
    for r in records:
        check_record(model, r, plan)
        if record_mask(r) is not None:
            raise UsageError(f"{r.name}: a masked record is edited one at a time")
    fits = [record_fit(r) for r in records]
    sources = [r.meta["source_prompt"] for r in records]
    out = [None] * len(records)
    for group in batches([(fits[k].canvas, sources[k] == targets[k]) for k in range(len(records))]):
        run = _run(model, plan, [(sources[k], targets[k]) for k in group], [plans[k].seed for k in group],
                   *_hw(fits[group[0]].canvas), callback)
        z = plan.engine.edit(run, engine_tensors([records[k] for k in group]))
        for j, k in enumerate(group):
            image = fits[k].undo(to_pil(model.decode(z[j : j + 1])))
            result = {"engine": plan.engine.name, "steps": plan.steps, **sizes(fits[k]), "defaults": plan.defaults}
            out[k] = (image, _shared(result, run, len(group)))
    return _stamped(out, started)


def check_record(model: Family, record: Record, plan: Plan) -> None:
    """The record's tensors against its header, its engine and the model: one line naming what is off."""
    latent = tuple(record.tensors["latent"].shape)
    w, h = record_fit(record).canvas
    expected = model.latent_shape(1, h, w)
    if latent != tuple(expected):
        raise DiffeditError(f"{record.name}: tensor 'latent' is {list(latent)} but an image of "
                            f"{w}x{h} has latents {list(expected)} on this model")
    plan.engine.check_record(record.tensors, plan.steps, plan.params, record.name)


def _check_mask(mask: EditMask, record: Record, fk: FKConfig | None, paste_back: bool) -> None:
    h, w = mask.weights.shape
    canvas = record_fit(record).canvas
    if (w, h) != canvas:
        raise UsageError(f"the mask is {w}x{h} pixels but the record's image is {canvas[0]}x{canvas[1]} on the "
                         "model's canvas; give a mask of the record's size")
    if fk is not None and fk.particles > 1:
        raise UsageError("FK steering is not combined with an edit mask")
    if paste_back and "pixels" not in record.tensors:
        raise UsageError("pasting the input back needs its pixels, which a record keeps only when inverted with a "
                         "mask: invert with --mask, or edit with --no-paste-back")


def generate_image(
    model: Family, prompt: str, *, seed: int | None = None, steps: int = 50, guidance_scale: float = 7.5,
    negative_prompt: str = "", width: int | None = None, height: int | None = None,
    guidance: GuidanceSpec | None = None, eta: float = 0.0, fk: FKConfig | None = None,
    reward: str = "saturation", callback: Callback | None = None, deepcache: int | None = None,
    solver: str = "ddim",
) -> tuple[Image.Image, dict]:
    """Sample an image; `eta` > 0 samples stochastically, `fk` steers K particles with a reward."""
    if fk is None or fk.particles <= 1:
        return generate_images(model, [prompt], [seed], steps=steps, guidance_scale=guidance_scale,
                               negative_prompt=negative_prompt, width=width, height=height, guidance=guidance,
                               eta=eta, callback=callback, deepcache=deepcache, solver=solver)[0]
    if deepcache:
        raise UsageError("--deepcache is not combined with FK steering")
    if solver != "ddim":  # resampling particles would mix the multistep solver's memory of earlier steps
        raise UsageError(f"--solver {solver} is not combined with FK steering")
    started = time.perf_counter()
    seed = secrets.randbelow(2**31) if seed is None else seed
    fit, height, width, shape, schedule = _canvas(model, steps, height, width, eta)
    fk.check()
    den = prompt_denoiser_for(model, [prompt] * fk.particles, guidance_scale, height, width, negative_prompt,
                              guidance)
    latents, rewards, stats = steer(den, schedule, shape, seed, load_reward(reward), prompt, model.decode, fk,
                                    model.device, callback, refresh=model.consistency)
    best = int(torch.nan_to_num(rewards, nan=-math.inf).argmax())
    out = fit.undo(to_pil(model.decode(latents[best : best + 1])))
    result = {"seed": seed, "steps": steps, **sizes(fit), **stats, "reward": float(rewards[best]),
              "rewards": [float(r) for r in rewards], "nfe": den.calls, "seconds": time.perf_counter() - started}
    return out, result


def generate_images(
    model: Family, prompts: list[str], seeds: list[int | None], *, steps: int = 50, guidance_scale: float = 7.5,
    negative_prompt: str = "", width: int | None = None, height: int | None = None,
    guidance: GuidanceSpec | None = None, eta: float = 0.0, callback: Callback | None = None,
    deepcache: int | None = None, solver: str = "ddim",
) -> list[tuple[Image.Image, dict]]:
    """Sample one image per prompt in a single batch (micro-batching).

    Each row draws its noise from its own generator exactly as a lone run does, and each latent is
    decoded alone, so every image equals the one `generate_image` gives (up to float rounding).
    """
    started = time.perf_counter()
    if model.consistency and eta:
        raise UsageError("--eta does not apply to latent-consistency models: each step draws all its noise afresh")
    seeds = [secrets.randbelow(2**31) if s is None else s for s in seeds]
    fit, height, width, shape, schedule = _canvas(model, steps, height, width, eta, solver)
    den = prompt_denoiser_for(model, prompts, guidance_scale, height, width, negative_prompt, guidance)
    if deepcache:
        from diffedit.deepcache import DeepCache

        den.deepcache = DeepCache(model.network, deepcache)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # initial noise, then each step's
    draw = lambda: torch.cat([torch.randn(shape, generator=g) for g in gens]).to(model.device)  # noqa: E731
    x = draw()
    z0 = sample(den, x, schedule, eta=eta, noise=lambda i: draw(), callback=callback, refresh=model.consistency)
    images = [fit.undo(to_pil(model.decode(z0[k : k + 1]))) for k in range(len(prompts))]
    seconds = time.perf_counter() - started
    extra = {"batched": len(prompts)} if len(prompts) > 1 else {}
    if den.deepcache is not None:
        extra["full_steps"] = den.deepcache.full_steps
    return [(img, {"seed": seed, "steps": steps, **sizes(fit), "nfe": den.calls, "forwards": dict(den.forwards),
                   "seconds": seconds, **extra}) for img, seed in zip(images, seeds)]


def _canvas(model: Family, steps: int, height: int | None, width: int | None, eta: float, solver: str = "ddim"):
    """How the asked size fits the model's multiple (sampled on the padded canvas, cropped back to the
    size), the canvas's height and width, the latent shape of one image, and the schedule of `solver`."""
    default_h, default_w = model.default_size()
    fit = Fit.of((width or default_w, height or default_h), model.multiple, "pad")
    if not 0 <= eta <= 1:
        raise UsageError(f"--eta {eta} must be in [0, 1]")
    if eta and solver != "ddim":
        raise UsageError(f"--eta applies to --solver ddim; --solver {solver} samples deterministically")
    width, height = fit.canvas
    return fit, height, width, model.latent_shape(1, height, width), model.schedule(steps, height, width, solver)


def image_params(command: str, model: Family, **fields) -> dict:
    """What a PNG output carries so the result can be reproduced."""
    from diffedit.records import adapters_meta

    made_with = {"source": model.source, "fingerprint": model.fingerprint, "family": model.name}
    if adapters_meta(model):
        made_with["adapters"] = adapters_meta(model)
    if model.loras:
        made_with["loras"] = model.loras
    return {"command": command, "diffedit": __version__, "model": made_with, **fields}


def edit_image(
    model: Family, source: str | Image.Image, plan: Plan, *, source_prompt: str, target_prompt: str,
    image: ImageInput = ImageInput(), callback: Callback | None = None, show_attention: bool = False,
    fk: FKConfig | None = None, reward: str = "saturation", adaptive_guidance: float | None = None,
    deepcache: int | None = None, mask: MaskInput | None = None,
) -> tuple[Image.Image, dict, Record]:
    """Invert an image with the source prompt, then regenerate it under the target prompt (only inside
    `mask`, when given)."""
    started = time.perf_counter()
    _check_accelerators(plan, adaptive_guidance, deepcache, fk)  # fail before the inversion
    if mask is not None and fk is not None and fk.particles > 1:
        raise UsageError("FK steering is not combined with an edit mask")
    record, inverted = invert_image(model, source, plan, prompt=source_prompt, image=image, mask=mask, check=False,
                                    callback=callback)
    out, edited = edit_record(model, record, target_prompt, plan, callback=callback, show_attention=show_attention,
                              fk=fk, reward=reward, adaptive_guidance=adaptive_guidance, deepcache=deepcache,
                              paste_back=mask.paste_back if mask is not None else True)
    return out, {**_both(inverted, edited), "seconds": time.perf_counter() - started}, record


def edit_images(model: Family, sources: list[str | Image.Image], plan: Plan, *, source_prompts: list[str],
                target_prompts: list[str], seeds: list[int] | None = None, image: ImageInput = ImageInput(),
                callback: Callback | None = None) -> list[tuple[Image.Image, dict, Record]]:
    """`edit_image` of several images under one plan, inversions and edits in shared forwards."""
    started = time.perf_counter()
    seeds = [plan.seed] * len(sources) if seeds is None else list(seeds)
    inverted = invert_images(model, sources, plan, prompts=source_prompts, seeds=seeds, image=image, check=False,
                             callback=callback)
    records = [record for record, _ in inverted]
    edited = edit_records(model, records, target_prompts, [replace(plan, seed=seed) for seed in seeds],
                          callback=callback)
    seconds = time.perf_counter() - started
    return [(out, {**_both(inv, ed), "seconds": seconds}, record)
            for (record, inv), (out, ed) in zip(inverted, edited)]


def _both(inverted: dict, edited: dict) -> dict:
    """An edit's result: the edit's fields, with the inversion's forwards added to its own."""
    forwards = dict(inverted["forwards"])
    for rows, calls in edited["forwards"].items():
        forwards[rows] = forwards.get(rows, 0) + calls
    return {**edited, "nfe": inverted["nfe"] + edited["nfe"], "forwards": forwards}


MOVE_FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class MoveInput:
    """One object move: the image, the object's mask (a file or image of the input's size; None: found
    from `mask_word`, words of the prompt), the move, and the seed of its noise."""

    source: str | Image.Image
    mask: str | Image.Image | None
    move: object  # editing.pixelman.MoveSpec
    seed: int = 0
    mask_word: str | None = None


def move_image(
    model: Family, source: str | Image.Image, mask: str | Image.Image | None, move, *, prompt: str = "",
    steps: int = 16, guidance_scale: float | None = None, negative_prompt: str = "", seed: int = 0,
    energy=None, image: ImageInput = ImageInput(), guidance: GuidanceSpec | None = None,
    callback: Callback | None = None, mask_word: str | None = None,
) -> tuple[Image.Image, dict]:
    """PixelMan: move (scale, duplicate) the masked object; `energy` None turns the energy guidance off.

    The mask must have the input image's size; both are brought to the model's multiple together.
    Without a mask, `mask_word` (words of `prompt`) finds the object by cross-attention.
    """
    return move_images(model, [MoveInput(source, mask, move, seed, mask_word)], prompt=prompt, steps=steps,
                       guidance_scale=guidance_scale, negative_prompt=negative_prompt, energy=energy, image=image,
                       guidance=guidance, callback=callback)[0]


def move_images(
    model: Family, moves: list[MoveInput], *, prompt: str = "", steps: int = 16, guidance_scale: float | None = None,
    negative_prompt: str = "", energy=None, image: ImageInput = ImageInput(), guidance: GuidanceSpec | None = None,
    callback: Callback | None = None,
) -> list[tuple[Image.Image, dict]]:
    """`move_image` of several moves with one prompt, those of one canvas size in shared forwards
    (micro-batching): every move keeps its own masks, attention control and energies, draws its noise
    from its own seed, and is encoded and decoded alone, so each output is a lone move's (up to float
    rounding)."""
    from diffedit.editing.attention import PerImage
    from diffedit.editing.pixelman import FeatureEnergy, PixelManControl, manipulate, move_latents, plan_move

    started = time.perf_counter()
    if model.name not in MOVE_FAMILIES:
        raise UsageError(f"move runs on UNet models ({', '.join(MOVE_FAMILIES)}), not {model.name}")
    planned = []
    for item in moves:
        raw, fit = read_image(model, item.source, image)
        if (item.mask is None) == (item.mask_word is None):
            raise UsageError("give a mask or a word of the prompt to find the object by")
        img = fit.apply(raw)
        width, height = img.size
        scale = (width / raw.width, height / raw.height) if fit.policy == "resize" else (1.0, 1.0)
        move = item.move.resized(*scale, fit.offset)  # the move is in the input's pixels
        pixels = to_tensor(img)
        if item.mask is None:
            mask_name = f"--mask-from-prompt {item.mask_word!r}"
            selected = mask_from_prompt(model, pixels, prompt, item.mask_word, item.seed)
        else:
            mask_name = item.mask if isinstance(item.mask, str) else "mask"
            mask_img = fit.apply(load_mask(item.mask, raw.size), Image.Resampling.NEAREST)
            selected = torch.from_numpy(np.asarray(mask_img) > 127)
        masks, centre, move = plan_move(selected, move, mask_name)
        z0_src, z0_man = model.encode_image(torch.cat([pixels, manipulate(pixels, selected, move, centre)])).clone()
        planned.append((fit, scale, masks, centre, move, z0_src[None], z0_man[None]))
    if guidance_scale is None:  # the paper: null prompt without CFG, or CFG 4 with a prompt
        guidance_scale = 4.0 if prompt else 1.0
    out = [None] * len(moves)
    for group in batches([p[0].canvas for p in planned]):
        width, height = planned[group[0]][0].canvas
        latent_hw = tuple(planned[group[0]][5].shape[-2:])
        controls = [PixelManControl(planned[k][2], latent_hw) for k in group]
        control = controls[0] if len(group) == 1 else PerImage(controls)
        denoise = prompt_denoiser_for(model, [prompt] * 3 * len(group), guidance_scale, height, width,
                                      negative_prompt, guidance, control)
        feature_energy = None
        if energy is not None:
            cond, _ = model.encode_prompts([prompt] * len(group), None, height, width)
            if model.membranes is not None:  # the prompt's SPM multipliers, as the sampling branches carry them
                cond = model.membranes.tag(cond, [prompt] * len(group))
            feature_energy = FeatureEnergy(model, cond, [planned[k][2:5] for k in group], energy, latent_hw)
        x0 = move_latents(denoise, feature_energy, controls, model.schedule(steps, height, width),
                          torch.cat([planned[k][5] for k in group]), torch.cat([planned[k][6] for k in group]),
                          [planned[k][2] for k in group], [torch.Generator().manual_seed(moves[k].seed) for k in group],
                          callback)
        for j, k in enumerate(group):
            fit, scale, _, centre, move, _, _ = planned[k]
            result = {"steps": steps, "seed": moves[k].seed, **sizes(fit), "guidance_scale": guidance_scale,
                      "forwards": dict(denoise.forwards),
                      "energy_passes": 0 if feature_energy is None else feature_energy.passes,
                      "backward_passes": 0 if feature_energy is None else feature_energy.backwards,
                      "moved_to": [round((c + d + o) / f, 1)  # in the input's pixels
                                   for c, d, o, f in zip(centre, (move.dx, move.dy), fit.offset, scale)]}
            # NFE: batched sampling forwards plus the energies' feature passes (each gradient adds a backward)
            result["nfe"] = denoise.calls + result["energy_passes"]
            if len(group) > 1:
                result["batched"] = len(group)
            out[k] = (fit.undo(to_pil(model.decode(x0[j : j + 1]))), result)
    return _stamped(out, started)
