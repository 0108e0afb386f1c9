"""ShapesBench: edit tasks in the toy world, judged by the checker for meaning and by PSNR/SSIM for
what should not change.

The task file (`samples/shapesbench.jsonl`, versioned) lists tasks of kinds `recolour`, `reshape`,
`move`, `erase` and `reconstruct`; each names the seed of its source scene (rendered by the shapes
generator, so no images are stored), the object it edits, the prompts, and what the checker must
find afterwards. The runner dispatches each kind to a task runner; text edits run any registered
engine through `diffedit.jobs.edit_image`, so new engines need no change here. Kinds with no runner
yet, and engines that do not do a kind (a text-edit engine on a move task), are reported as skipped.
Move tasks run PixelMan (`--engine pixelman`) and two baselines, `copy-paste` and `ddim`. Erase tasks
(v2) regenerate the scene with an engine after attaching a shipped SPM adapter.

A second file, `samples/shapesbench-heldout.jsonl`, holds tasks of the same kinds (no erase or
reconstruction) on scenes the first never shows: a model folder's settings are chosen on the first and
checked on it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from diffedit.errors import DiffeditError
from diffedit.families import Family
from diffedit.toy.checker import check
from diffedit.toy.shapes import COLOURS, SHAPES, make_scene, with_object

VERSION = 3  # v2 added the erase tasks, v3 moves on the world's white
TASKS = Path(__file__).resolve().parents[2] / "samples" / "shapesbench.jsonl"
# Tasks of the same kinds on other scenes: settings chosen on TASKS (a model folder's diffedit.json) are
# checked on these, which nothing was tuned on.
HELD_OUT = TASKS.with_name("shapesbench-heldout.jsonl")


# -- the task file -------------------------------------------------------------------------------------


def make_tasks(seed: int = 0, recolour: int = 40, reshape: int = 40, move: int = 20, reconstruct: int = 10,
               erase: int = 10, white_move: int = 12, first_scene: int = 10**6) -> list[dict]:
    """The fixed task list (written to samples/shapesbench.jsonl by `diffedit toy make-bench`); scenes are
    drawn from seeds above `first_scene`."""
    rng = np.random.default_rng(seed)
    tasks, scene_seed = [], first_scene

    def next_scene(max_objects=2):
        nonlocal scene_seed
        while True:
            scene_seed += 1
            n = int(rng.integers(1, max_objects + 1))
            scene = make_scene(scene_seed, n_objects=n, two_tone=0.0)
            if len(scene.objects) == n:
                return scene_seed, n, scene

    for kind, count in (("recolour", recolour), ("reshape", reshape), ("move", move), ("reconstruct", reconstruct)):
        for k in range(count):
            sid, n, scene = next_scene(1 if kind == "move" else 2)
            obj = scene.objects[0]
            task = {"id": f"{kind}-{k:03d}", "version": 1, "kind": kind, "scene_seed": sid, "n_objects": n,
                    "object": 0, "source_prompt": scene.caption}
            if kind == "recolour":
                colour = [c for c in COLOURS if c != obj.colour][rng.integers(len(COLOURS) - 1)]
                task["expect"] = {"colour": colour}
            elif kind == "reshape":
                shape = [s for s in SHAPES if s != obj.shape][rng.integers(len(SHAPES) - 1)]
                task["expect"] = {"shape": shape}
            elif kind == "move":
                for _ in range(100):
                    dx, dy = (int(v) for v in rng.integers(-20, 21, 2))
                    cx, cy = obj.center[0] + dx, obj.center[1] + dy
                    if math.hypot(dx, dy) > obj.size * 1.5 and _fits(obj, cx, cy):
                        break
                task.update(dx=dx, dy=dy, expect={"center": [round(cx, 1), round(cy, 1)]})
            else:
                task["expect"] = {}
            if "colour" in task.get("expect", {}) or "shape" in task.get("expect", {}):
                target = with_object(scene, 0, **task["expect"])
                task["target_prompt"] = target.caption
            else:
                task["target_prompt"] = scene.caption
            tasks.append(task)
    for k in range(erase):  # v2: the scene's object 0 shows the concept of a shipped SPM adapter, object 1 not
        concept = ERASE_CONCEPTS[k % len(ERASE_CONCEPTS)]
        while True:
            sid, n, scene = next_scene(2)
            if n == 2 and _has_concept(scene.objects[0], concept) and not _has_concept(scene.objects[1], concept):
                break
        tasks.append({"id": f"erase-{k:03d}", "version": 2, "kind": "erase", "scene_seed": sid, "n_objects": n,
                      "object": 0, "source_prompt": scene.caption, "target_prompt": scene.caption,
                      "concept": concept, "adapter": f"toy-sd-spm/{concept}.spm.safetensors",
                      "expect": {"absent": concept}})
    for k in range(white_move):  # v3: one object on the world's white, moved by (18, 14) px, mirrored to fit
        shape = SHAPES[k % len(SHAPES)]
        while True:
            sid, n, scene = next_scene(1)
            obj = scene.objects[0]
            if scene.background == ("white",) and obj.shape == shape:
                break
        dx = 18 if obj.center[0] + 18 < 62 - obj.size else -18
        dy = 14 if obj.center[1] + 14 < 62 - obj.size else -14
        cx, cy = obj.center[0] + dx, obj.center[1] + dy
        if not _fits(obj, cx, cy):
            continue  # too big to move that far either way
        tasks.append({"id": f"move-white-{k:03d}", "version": 3, "kind": "move", "scene_seed": sid, "n_objects": 1,
                      "object": 0, "source_prompt": scene.caption, "target_prompt": scene.caption, "dx": dx, "dy": dy,
                      "expect": {"center": [round(cx, 1), round(cy, 1)]}})
    return tasks


def make_held_out_tasks() -> list[dict]:
    """The held-out task list (samples/shapesbench-heldout.jsonl, `diffedit toy make-bench --held-out`):
    40 recolours, 40 reshapes, 20 moves among objects and 12 on white, on scenes from seeds far above
    those of TASKS (ids prefixed "heldout-")."""
    tasks = make_tasks(seed=1, reconstruct=0, erase=0, first_scene=2 * 10**6)
    return [{**task, "id": f"heldout-{task['id']}"} for task in tasks]


def _fits(obj, cx: float, cy: float) -> bool:
    """Whether `obj` centred at (cx, cy) stays 2 px inside a 64-px scene."""
    return obj.size + 2 < cx < 62 - obj.size and obj.size + 2 < cy < 62 - obj.size


ERASE_CONCEPTS = ("red", "circle")  # the adapters shipped in samples/toy-sd-spm


def _has_concept(obj, concept: str) -> bool:
    return concept in (obj.colour, obj.shape)


def load_tasks(path: Path = TASKS) -> list[dict]:
    if not path.exists():
        raise DiffeditError(f"{path}: ShapesBench task file missing; run `diffedit toy make-bench`")
    tasks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    newer = [t["id"] for t in tasks if t.get("version", 0) > VERSION]
    if newer:
        raise DiffeditError(f"{path}: tasks {newer[:3]} need a newer diffedit (ShapesBench v{VERSION} here)")
    return tasks


# -- judging -------------------------------------------------------------------------------------------


def source_scene(task: dict):
    scene = make_scene(task["scene_seed"], n_objects=task["n_objects"], two_tone=0.0)
    if scene.caption != task["source_prompt"]:
        raise DiffeditError(f"task {task['id']}: its scene no longer renders as described (generator changed)")
    return scene


def expected_scene(task: dict):
    """What the checker should find after the edit."""
    scene, expect = source_scene(task), task["expect"]
    if task["kind"] in ("recolour", "reshape"):
        return with_object(scene, task["object"], **expect)
    if task["kind"] == "move":
        return with_object(scene, task["object"], center=tuple(expect["center"]))
    return scene


def judge(task: dict, edited: np.ndarray) -> dict:
    """Edit success by the checker, and preservation outside the edited region."""
    source, expected = source_scene(task), expected_scene(task)
    found = check(edited)
    success = True
    for obj in expected.objects:
        near = [d for d in found if math.dist(d.centroid, obj.center) <= 4.0]
        if not near or near[0].shape != obj.shape or near[0].colour != obj.colour:
            success = False
    if task["kind"] == "move":  # nothing may remain where the object was
        old = source.objects[task["object"]]
        success &= not any(math.dist(d.centroid, old.center) <= 4.0 for d in found)
    if task["kind"] == "erase":  # the concept is nowhere; the other objects stay as they were
        success = not any(_has_concept(d, task["concept"]) for d in found)
        for i, obj in enumerate(source.objects):
            near = [d for d in found if math.dist(d.centroid, obj.center) <= 4.0]
            if i != task["object"] and (not near or near[0].shape != obj.shape or near[0].colour != obj.colour):
                success = False
    edit_region = np.zeros(source.image.shape[:2], bool)
    if task["kind"] != "reconstruct":
        edit_region |= source.masks[task["object"]] | expected.masks[task["object"]]
        edit_region = cv2.dilate(edit_region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    keep = ~edit_region
    return {"success": bool(success), "bg_psnr": masked_psnr(edited, source.image, keep),
            "bg_ssim": masked_ssim(edited, source.image, keep)}


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64))[mask]
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    return float(full.mean(axis=2)[mask].mean())


# -- running -------------------------------------------------------------------------------------------

TaskRunner = Callable[[Family, dict, Image.Image, dict], "tuple[Image.Image, dict] | None"]  # None: skipped


def _engine_task(runner: TaskRunner) -> TaskRunner:
    """A runner for registered engines only; other methods (PixelMan, the move baselines) skip it."""

    def run_if_engine(model, task, source, options):
        from diffedit.inversion import engine_names

        return runner(model, task, source, options) if options["engine"] in engine_names() else None

    return run_if_engine


@_engine_task
def text_edit(model: Family, task: dict, source: Image.Image, options: dict) -> tuple[Image.Image, dict] | None:
    from diffedit.images import to_pil
    from diffedit.jobs import edit_image, record_mask

    rest = {k: v for k, v in options.items() if k not in PLAN_OPTIONS + MASK_OPTIONS}  # adaptive guidance, DeepCache
    image, result, record = edit_image(model, source, _plan(model, options), source_prompt=task["source_prompt"],
                                       target_prompt=task["target_prompt"], mask=task_mask(task, options), **rest)
    mask = record_mask(record)
    if mask is not None:  # outside the (feathered) mask: the edit, and the VAE's round trip, against the input
        outside, original = mask.weights == 0, np.asarray(source)
        vae = np.asarray(to_pil(model.decode(record.tensors["latent"])))
        result.update(outside_mask_psnr=masked_psnr(np.asarray(image), original, outside),
                      outside_mask_vae_psnr=masked_psnr(vae, original, outside))
    return image, result


PLAN_OPTIONS = ("engine", "steps", "params", "guidance", "guidance_scale", "inversion_guidance_scale")
MASK_OPTIONS = ("mask", "paste_back", "mask_dilate")


def task_mask(task: dict, options: dict):
    """The edit mask a user would give for a text-edit task (`options["mask"]`): "object" draws the
    edited object where it is and where it will be (a file), "words" names it by the source prompt's
    words (`--mask-from-prompt`); None: no mask."""
    from diffedit.jobs import MaskInput
    from diffedit.masks import MaskOptions

    how = options.get("mask")
    if how is None:
        return None
    paste_back = options.get("paste_back", True)
    if how == "words":
        obj = source_scene(task).objects[task["object"]]
        shape = MaskOptions(dilate=options.get("mask_dilate") or 0)
        return MaskInput(words=f"{obj.colour} {obj.shape}", options=shape, paste_back=paste_back)
    if how != "object":
        raise ValueError(f"unknown mask kind {how!r}: object or words")
    region = source_scene(task).masks[task["object"]] | expected_scene(task).masks[task["object"]]
    return MaskInput(Image.fromarray(region.astype(np.uint8) * 255), paste_back=paste_back)


def _plan(model: Family, options: dict):
    """The plan of a task's edit from the benchmark's options (the engine's defaults where not given)."""
    from diffedit.plan import plan_job

    return plan_job(model, **{k: options[k] for k in PLAN_OPTIONS if options.get(k) is not None})


@_engine_task
def reconstruction(model: Family, task: dict, source: Image.Image, options: dict) -> tuple[Image.Image, dict] | None:
    """Invert and regenerate with the same prompt and guidance: the engine's round trip."""
    from diffedit.jobs import invert_image, reconstruct_record

    record, inverted = invert_image(model, source, _plan(model, options), prompt=task["source_prompt"], check=False)
    image, result = reconstruct_record(model, record)
    return image, {**result, "nfe": inverted["nfe"] + result["nfe"]}


MOVE_METHODS = ("pixelman", "copy-paste", "ddim")


def object_move(model: Family, task: dict, source: Image.Image, options: dict) -> tuple[Image.Image, dict] | None:
    """A move task with PixelMan (`diffedit move`; `params` may set prompt, seed and energy_scale, which
    defaults as in `diffedit move`: the model folder's recommendation, else the paper's 0.5) or a
    baseline: `copy-paste` (the object's pixels pasted at the new place, no diffusion) or `ddim`
    (DDIM-invert the source without a prompt, paste the object's inverted latents at the new place,
    regenerate: the inversion-based route PixelMan avoids)."""
    from diffedit.editing.pixelman import EnergyWeights, MoveSpec, manipulate, plan_move
    from diffedit.images import to_tensor

    method = options["engine"]
    if method not in MOVE_METHODS:
        return None
    mask = source_scene(task).masks[task["object"]]
    move = MoveSpec(task["dx"], task["dy"])
    if method == "pixelman":
        from diffedit.jobs import move_image
        from diffedit.plan import move_energy_scale

        params = dict(options.get("params") or {})
        energy = EnergyWeights.at_scale(move_energy_scale(model, params.pop("energy_scale", None))[0])
        return move_image(model, source, Image.fromarray(mask.astype(np.uint8) * 255), move,
                          steps=options.get("steps") or 16, guidance_scale=options.get("guidance_scale"),
                          energy=energy, **params)
    selected = torch.from_numpy(mask)
    masks, centre, move = plan_move(selected, move)
    pixels = to_tensor(source)
    if method == "copy-paste":
        from diffedit.images import to_pil

        return to_pil(manipulate(pixels, selected, move, centre)), {"nfe": 0}
    return _ddim_move(model, pixels, masks, centre, move, options.get("steps") or 50)


def _ddim_move(model: Family, pixels, masks, centre, move, steps: int) -> tuple[Image.Image, dict]:
    from diffedit.denoiser import branch_denoiser
    from diffedit.editing.pixelman import at, warp
    from diffedit.images import to_pil
    from diffedit.sampling import invert, sample

    height, width = pixels.shape[-2:]
    z0 = model.encode_image(pixels)
    denoise = branch_denoiser(model, "", 1.0, height, width)
    schedule = model.schedule(steps, height, width)
    noise = invert(denoise, z0, schedule)[-1]
    h, w = noise.shape[-2:]
    pasted = at(masks.gen, h, w)[None, None].to(noise.device, noise.dtype)
    noise = noise * (1 - pasted) + warp(noise, centre, move, width / w, mode="nearest") * pasted
    z = sample(denoise, noise, schedule)
    return to_pil(model.decode(z)), {"nfe": denoise.calls}


@_engine_task
def concept_erase(model: Family, task: dict, source: Image.Image, options: dict) -> tuple[Image.Image, dict] | None:
    """Invert the scene under its caption with the model as it is, then regenerate it under the same
    caption with the task's SPM adapter attached: the concept should leave the image, the rest stay."""
    from diffedit.editing.spm import apply_files
    from diffedit.jobs import edit_record, invert_image
    plan = _plan(model, options)
    record, inverted = invert_image(model, source, plan, prompt=task["source_prompt"], check=False)
    apply_files(model, [str(TASKS.parent / task["adapter"])])
    try:
        image, result = edit_record(model, record, task["target_prompt"], plan)
    finally:
        apply_files(model, None)
    return image, {**result, "nfe": inverted["nfe"] + result["nfe"]}


RUNNERS: dict[str, TaskRunner] = {"recolour": text_edit, "reshape": text_edit, "reconstruct": reconstruction,
                                  "move": object_move, "erase": concept_erase}


def _defaults_from(model: Family, engine: str, kind: str, options: dict) -> str:
    """Where a run's unset options for one kind of task come from: "paper", or the model folder's
    settings file (its engine settings for the text edits, its move settings for PixelMan's moves; the
    move baselines take nothing from it)."""
    if kind == "move":
        if engine != "pixelman":
            return "paper"
        from diffedit.plan import move_energy_scale

        return move_energy_scale(model, (options.get("params") or {}).get("energy_scale"))[1]
    from diffedit.inversion import engine_names

    if engine not in engine_names():  # PixelMan and copy-paste do only moves
        return "paper"
    return _plan(model, {**options, "engine": engine}).defaults


def run(model: Family, engine: str, *, kinds: list[str] | None = None, limit: int | None = None,
        options: dict | None = None, tasks_path: Path = TASKS, progress=None) -> list[dict]:
    """Run the benchmark with one engine; one row per task."""
    tasks = [t for t in load_tasks(tasks_path) if kinds is None or t["kind"] in kinds]
    if limit:  # the first `limit` tasks of each kind
        kept, seen = [], {}
        for task in tasks:
            seen[task["kind"]] = seen.get(task["kind"], 0) + 1
            if seen[task["kind"]] <= limit:
                kept.append(task)
        tasks = kept
    rows = []
    # A run with settings of its own (guidance, engine parameters, a mask) is its own row group in the tables.
    options = options or {}
    settings = [] if options.get("guidance_scale") is None else [f"CFG {options['guidance_scale']:g}"]
    settings += [f"{key} {value}" for key, value in sorted((options.get("params") or {}).items())]
    if options.get("mask"):
        settings.append(f"mask: {options['mask']}")
        settings += [f"dilated {options['mask_dilate']} px"] if options.get("mask_dilate") else []
        settings += [] if options.get("paste_back", True) else ["no paste-back"]
    tasks_named = [] if Path(tasks_path).resolve() == TASKS else [f"tasks: {Path(tasks_path).name}"]
    labels = {}
    for kind in {task["kind"] for task in tasks}:
        # "folder settings": the model folder's diffedit.json filled in what the run left unset
        folder = ["folder settings"] if _defaults_from(model, engine, kind, options) != "paper" else []
        named = settings + folder + tasks_named
        labels[kind] = f"{engine} ({', '.join(named)})" if named else engine
    for task in tasks:
        label = labels[task["kind"]]
        runner = RUNNERS.get(task["kind"])
        if runner is None:
            rows.append({"id": task["id"], "kind": task["kind"], "engine": label, "status": "skipped"})
            continue
        source = Image.fromarray(source_scene(task).image)
        started = time.perf_counter()
        done = runner(model, task, source, {"engine": engine, **options})
        if done is None:  # this engine does not do this kind of task
            rows.append({"id": task["id"], "kind": task["kind"], "engine": label, "status": "skipped"})
            continue
        image, result = done
        row = {"id": task["id"], "kind": task["kind"], "engine": label, "status": "ok",
               "nfe": result["nfe"], "seconds": time.perf_counter() - started, **judge(task, np.asarray(image)),
               **{k: result[k] for k in ("outside_mask_psnr", "outside_mask_vae_psnr") if k in result}}
        rows.append(row)
        if progress:
            progress(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per engine and kind: success %, mean background PSNR/SSIM, NFE, seconds per edit."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["engine"], r["kind"]), []).append(r)
    out = []
    for (engine, kind), rs in sorted(groups.items()):
        finite = [r["bg_psnr"] for r in rs if math.isfinite(r["bg_psnr"])]
        out.append({"engine": engine, "kind": kind, "tasks": len(rs),
                    "success_pct": round(100 * sum(r["success"] for r in rs) / len(rs), 1),
                    "bg_psnr": round(float(np.mean(finite)), 2) if finite else math.inf,
                    "bg_ssim": round(float(np.mean([r["bg_ssim"] for r in rs])), 4),
                    "nfe": round(float(np.mean([r["nfe"] for r in rs])), 1),
                    "seconds": round(float(np.mean([r["seconds"] for r in rs])), 3),
                    **{k: _mean_psnr([r[k] for r in rs]) for k in ("outside_mask_psnr", "outside_mask_vae_psnr")
                       if k in rs[0]}})
    return out


def _mean_psnr(values: list[float]) -> float:
    """Mean of the finite values; inf when every value is (identical pixels)."""
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 2) if finite else math.inf


def markdown(summary: list[dict]) -> str:
    masked = any("outside_mask_psnr" in s for s in summary)  # edit masks: PSNR outside them too
    extra = " PSNR outside the mask (dB) | VAE round trip there (dB) |" if masked else ""
    lines = ["| engine | task | tasks | edit success % | background PSNR (dB) | background SSIM | NFE | s / edit |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if masked else "")]
    for s in summary:
        cells = f" {s.get('outside_mask_psnr', '—')} | {s.get('outside_mask_vae_psnr', '—')} |" if masked else ""
        lines.append(f"| {s['engine']} | {s['kind']} | {s['tasks']} | {s['success_pct']} | {s['bg_psnr']} | "
                     f"{s['bg_ssim']} | {s['nfe']} | {s['seconds']} |" + cells)
    return "\n".join(lines)
