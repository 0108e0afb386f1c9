"""Engines' cost: wall time of invert and edit against the network forwards they make, and
edit-friendly DDPM against diffusers' LEDITS++ doing the same job; side by side in one run.

The forward cost is measured for every batch size an engine uses (CFG doubles the rows, Direct
Inversion edits source and target together, InfEdit runs three branches), so the ratio
`seconds / sum(calls x forward(batch))` is the engine's own overhead. The VAE is outside both. Each
repeat's forwards are timed right after its run and the ratio taken per repeat (then the median), so a
slow or fast spell of this shared machine moves both sides of a ratio together.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
from PIL import Image

from diffedit.families import Family, adapter_for
from diffedit.images import to_tensor
from diffedit.jobs import edit_record, invert_image
from diffedit.plan import plan_job
from lab.benchmarks.overhead import _timed, mid_size_sd1
from lab.testing import SD3Transformer2DModel, StableDiffusion3Pipeline, tiny_lcm_pipeline, tiny_pipeline

ENGINES = ("ddim", "ddpm-ef", "bdia", "direct", "ddim-p2p", "infedit")
FLOW_ENGINES = ("ddim", "rf-inversion", "flowedit", "rf-solver", "fireflow")
SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


def forward_seconds(model: Family, rows: int, size: int, repeats: int = 5) -> float:
    text = model.encode_prompts([SOURCE] * rows, None, size, size)[0]
    x = torch.randn(model.latent_shape(rows, size, size))
    t = model.schedule(10, size, size).times[3]
    with torch.inference_mode():
        model.forward(x, t, text)
        return statistics.median(_timed(lambda: model.forward(x, t, text)) for _ in range(repeats))


def measure(model: Family, image: Image.Image, engine: str, steps: int, repeats: int,
            params: dict | None = None, label: str = "") -> dict:
    """Median seconds of invert and edit, and the median over repeats of each one's seconds ÷ the
    forwards it made, timed bare right after it (paired: a slow spell of the machine slows both)."""
    size = image.height
    invert_t, edit_t, invert_r, edit_r = [], [], [], []
    for _ in range(repeats):  # the VAE's share (measured alone) is taken out of both
        plan = plan_job(model, engine=engine, steps=steps, params=params)
        done = {}
        invert_t.append(_timed(lambda: done.update(inv=invert_image(model, image, plan, prompt=SOURCE, check=False)))
                        - _encode_seconds(model, image))
        record, inv = done["inv"]
        edit_t.append(_timed(lambda: done.update(ed=edit_record(model, record, TARGET, plan)))
                      - _decode_seconds(model, record))
        ed = done["ed"][1]
        fwd = {rows: forward_seconds(model, rows, size, 3) for rows in set(inv["forwards"]) | set(ed["forwards"])}
        cost = lambda forwards: sum(calls * fwd[rows] for rows, calls in forwards.items())  # noqa: E731
        invert_r.append(invert_t[-1] / cost(inv["forwards"]) if inv["nfe"] else None)
        edit_r.append(edit_t[-1] / cost(ed["forwards"]) if ed["nfe"] else None)
    ratio = lambda values: None if values[0] is None else round(statistics.median(values), 3)  # noqa: E731
    return {"engine": engine + label, "steps": steps, "invert_nfe": inv["nfe"], "edit_nfe": ed["nfe"],
            "invert_s": round(statistics.median(invert_t), 4), "edit_s": round(statistics.median(edit_t), 4),
            "invert_over_forwards": ratio(invert_r), "edit_over_forwards": ratio(edit_r)}


_VAE_CACHE: dict = {}


def _encode_seconds(model, image) -> float:
    key = ("enc", id(model), image.size)
    if key not in _VAE_CACHE:
        pixels = to_tensor(image)
        model.encode_image(pixels)
        _VAE_CACHE[key] = statistics.median(_timed(lambda: model.encode_image(pixels)) for _ in range(3))
    return _VAE_CACHE[key]


def _decode_seconds(model, record) -> float:
    key = ("dec", id(model), tuple(record.tensors["latent"].shape))
    if key not in _VAE_CACHE:
        z = record.tensors["latent"]
        model.decode(z)
        _VAE_CACHE[key] = statistics.median(_timed(lambda: model.decode(z)) for _ in range(3))
    return _VAE_CACHE[key]


def ledits_comparison(pipe, model: Family, image: Image.Image, steps: int, repeats: int) -> dict:
    """EF-DDPM invert (CFG 3.5 on the source prompt) + regeneration, ours vs diffusers' LEDITS++."""
    from diffusers import DDIMScheduler, LEditsPPPipelineStableDiffusion

    class IntIndexDDIM(DDIMScheduler):  # diffusers 0.42.1's LEDITS++ indexes with a float tensor
        def add_noise(self, original, noise, timesteps):
            return super().add_noise(original, noise, timesteps.long())

    parts = {k: v for k, v in pipe.components.items() if k in LEditsPPPipelineStableDiffusion.__init__.__code__.co_varnames}
    parts["scheduler"] = IntIndexDDIM.from_config(pipe.scheduler.config)
    ledits = LEditsPPPipelineStableDiffusion(**parts)
    ledits.set_progress_bar_config(disable=True)

    def theirs():
        ledits.invert(image=image, source_prompt=SOURCE, source_guidance_scale=3.5, num_inversion_steps=steps,
                      skip=0.0, generator=torch.Generator().manual_seed(0))
        ledits(output_type="latent")

    def ours():
        plan = plan_job(model, engine="ddpm-ef", steps=steps, params={"skip": 0}, inversion_guidance_scale=3.5,
                        guidance_scale=1.0)  # all steps, as LEDITS++ here
        record, _ = invert_image(model, image, plan, prompt=SOURCE, check=False)
        edit_record(model, record, "", plan)

    theirs(), ours()
    t_theirs, t_ours = [], []
    for _ in range(repeats):
        t_theirs.append(_timed(theirs))
        t_ours.append(_timed(ours))
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    return {"job": "ddpm-ef invert + regenerate", "steps": steps, "ours_s": round(a, 3), "ledits_pp_s": round(b, 3),
            "ours_over_ledits_pp": round(a / b, 3)}


def run(repeats: int = 3, quick: bool = False, flow_only: bool = False) -> tuple[list[dict], list[dict]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = 10 if quick else 20
    flow = adapter_for(tiny_pipeline("sd3") if quick else mid_size_sd3(), "sd3", 16)
    flow_image = _scene(32 if quick else 64)
    flow_rows = [measure(flow, flow_image, engine, steps, repeats, label=" (sd3)") for engine in FLOW_ENGINES]
    if flow_only:
        return flow_rows, []
    pipe = tiny_pipeline("sd1") if quick else mid_size_sd1()
    pipe.set_progress_bar_config(disable=True)
    model = adapter_for(pipe, "sd1")
    image = _scene(32 if quick else 256)
    rows = [measure(model, image, engine, steps, repeats) for engine in ENGINES]
    pnp = {"inject_features": 0.4}
    rows += [measure(model, image, engine, steps, repeats, pnp, " + features 0.4") for engine in ("direct", "infedit")]
    lcm = adapter_for(tiny_lcm_pipeline() if quick else mid_size_lcm(), "sd1")
    lcm_steps = 4 if quick else 15  # InfEdit's paper runs LCMs at 15 steps
    rows += [measure(lcm, image, "infedit", lcm_steps, repeats, label=" (LCM)"),
             measure(lcm, image, "infedit", lcm_steps, repeats, pnp, " (LCM) + features 0.4")]
    return rows + flow_rows, [ledits_comparison(pipe, model, image, steps, repeats)]


def _scene(size: int) -> Image.Image:
    a = np.full((size, size, 3), 240, np.uint8)
    a[size // 4 : size // 2, size // 4 : size // 2] = (220, 30, 30)
    return Image.fromarray(a)


def mid_size_lcm():
    """The mid-size SD1 with a guidance input (LCM-Dreamshaper's 256 wide) and diffusers' LCM scheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    sd = mid_size_sd1(time_cond_proj_dim=256)
    parts = {k: v for k, v in sd.components.items() if k != "scheduler"}
    return LatentConsistencyModelPipeline(**parts, scheduler=LCMScheduler.from_config(sd.scheduler.config),
                                          requires_safety_checker=False)


def mid_size_sd3() -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline with a transformer of 6 joint blocks 256 wide (4 heads of 64, patch 2):
    256 image tokens at 64² (the tiny VAE halves), about 0.1 s a forward here."""
    torch.manual_seed(0)
    small = tiny_pipeline("sd3")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=256, pooled_projection_dim=64,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(**{**small.components, "transformer": transformer})


def markdown(rows: list[dict], comparison: list[dict]) -> str:
    lines = ["| engine | steps | invert NFE | edit NFE | invert (s) | edit (s) | invert ÷ forwards | edit ÷ forwards |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dash = lambda v: "—" if v is None else v  # noqa: E731  (inversion-free engines)
        lines.append(f"| {r['engine']} | {r['steps']} | {r['invert_nfe']} | {r['edit_nfe']} | "
                     f"{r['invert_s'] if r['invert_nfe'] else '—'} | {r['edit_s']} | "
                     f"{dash(r['invert_over_forwards'])} | {dash(r['edit_over_forwards'])} |")
    if comparison:
        lines += ["", "| job | steps | ours (s) | LEDITS++ (s) | ours ÷ LEDITS++ |", "|---|---|---|---|---|"]
    for c in comparison:
        lines.append(f"| {c['job']} | {c['steps']} | {c['ours_s']} | {c['ledits_pp_s']} | {c['ours_over_ledits_pp']} |")
    return "\n".join(lines)
