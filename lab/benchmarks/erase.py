"""SPM concept erasure on the toy model: what `diffedit bench erase` measures.

For N seeded single-object prompts naming each erased concept ("a red square on a grey background"),
and N naming none of them (the preserved set), images with and without the adapters, same seeds:
- concept rate: the share of images in which the checker finds an object of the erased colour or
  shape (any object), without and with the adapter;
- preserved prompts: the checker's success (the asked shape and colour) without and with the adapter,
  and how close the images stay to the no-adapter images (PSNR, SSIM; identical images count as
  100 dB);
- the same with facilitated transport on (`calibrated`), as the paper defines it (`paper`) and off;
- two adapters at once; and the first adapter on a fine-tuned copy of the model (transfer);
- what the erased prompts draw instead: images with any object, and whose largest object keeps the
  prompt's other attribute (a "red square" prompt's shape).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffedit.editing import spm
from diffedit.images import psnr
from diffedit.toy.checker import check
from lab.toy.quality import generate_batch, judge, prompt_set

CAP_DB = 100.0  # PSNR of identical images, so means stay finite


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def prompts_for(concepts: list[str], n: int, seed: int = 7) -> tuple[dict[str, list], list]:
    """n prompts naming each concept, n naming none of them: (prompt, shape, colour) triples."""
    pool = prompt_set(40 * n, seed=seed)
    named = {c: [p for p in pool if c in (p[1], p[2])][:n] for c in concepts}
    other = [p for p in pool if not any(c in (p[1], p[2]) for c in concepts)][:n]
    return named, other


def _images(model, prompts, steps, guidance_scale, batch=25):
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        out += generate_batch(model, [p for p, _, _ in chunk], list(range(start, start + len(chunk))), steps,
                              guidance_scale)
    return out


def concept_rate(images, concept: str) -> float:
    return 100 * float(np.mean([any(concept in (o.shape, o.colour) for o in check(i)) for i in images]))


def other_kept(images, prompts, concept: str) -> float:
    """Share of images whose largest object keeps the prompt's attribute that is not the concept
    (the shape of a "red ..." prompt, the colour of a "... circle" prompt)."""
    ok = []
    for image, (_, shape, colour) in zip(images, prompts):
        s, c = judge(image, shape, colour)
        ok.append(s if colour == concept else c)
    return 100 * float(np.mean(ok))


def success(images, prompts) -> float:
    return 100 * float(np.mean([all(judge(i, s, c)) for i, (_, s, c) in zip(images, prompts)]))


def closeness(images, reference) -> tuple[float, float]:
    values = [min(psnr(a, b), CAP_DB) for a, b in zip(images, reference)]
    return round(statistics.mean(values), 2), round(statistics.mean(_ssim(a, b) for a, b in zip(images, reference)), 4)


def run(model, adapters: list[str], n: int = 50, steps: int = 30, guidance_scale: float = 5.0,
        finetune_steps: int = 300, finetuned: str | None = None, log=print) -> list[dict]:
    from diffedit.models import load_model

    membranes = spm.load_membranes(adapters)
    concepts = [m.concept for m in membranes]
    named, other = prompts_for(concepts, n)
    rows = []
    started = time.perf_counter()

    def measure(label, model, files, transport, base_named, base_other, which=None):
        spm.apply_files(model, files, transport)
        try:
            row = {"setting": label, "adapters": ", ".join(Path(f).name for f in files), "transport": transport}
            for c in which or concepts:
                imgs = _images(model, named[c], steps, guidance_scale)
                row[f"{c}_rate_without"] = round(concept_rate(base_named[c], c), 1)
                row[f"{c}_rate_with"] = round(concept_rate(imgs, c), 1)
                # what the erased prompts draw instead: any object at all, and the prompt's other attribute
                row[f"{c}_object_with"] = round(100 * float(np.mean([bool(check(i)) for i in imgs])), 1)
                row[f"{c}_other_kept_with"] = round(other_kept(imgs, named[c], c), 1)
            imgs = _images(model, other, steps, guidance_scale)
            row["preserved_success_without"] = round(success(base_other, other), 1)
            row["preserved_success_with"] = round(success(imgs, other), 1)
            row["preserved_psnr"], row["preserved_ssim"] = closeness(imgs, base_other)
            row["preserved_identical_pct"] = round(100 * float(np.mean([np.array_equal(a, b) for a, b in zip(imgs, base_other)])), 1)
        finally:
            spm.detach(model)
        log(f"{label}: {row}  ({time.perf_counter() - started:.0f} s)")
        rows.append(row)

    spm.detach(model)
    base_named = {c: _images(model, named[c], steps, guidance_scale) for c in concepts}
    base_other = _images(model, other, steps, guidance_scale)
    log(f"baseline done ({time.perf_counter() - started:.0f} s)")
    first = [adapters[0]]
    for transport in ("calibrated", "paper", "off"):
        measure(f"{concepts[0]} adapter, transport {transport}", model, first, transport, base_named, base_other,
                [concepts[0]])
    if len(adapters) > 1:
        for transport in ("calibrated", "off"):
            measure(f"{' + '.join(concepts)} adapters, transport {transport}", model, adapters, transport,
                    base_named, base_other)
    # transfer: the first adapter on a fine-tuned copy (made here unless given)
    with tempfile.TemporaryDirectory() as tmp:
        if finetuned is None:
            from lab.toy.train import finetune

            finetuned = str(Path(tmp) / "toy-sd-finetuned")
            info = finetune(model.source, Path(finetuned), steps=finetune_steps, seed=1)
            log(f"fine-tuned copy: {info}")
        tuned = load_model(finetuned, device=str(model.device))
        tuned_named = {concepts[0]: _images(tuned, named[concepts[0]], steps, guidance_scale)}
        tuned_other = _images(tuned, other, steps, guidance_scale)
        measure(f"{concepts[0]} adapter on a fine-tuned copy ({finetune_steps} steps), transport calibrated",
                tuned, first, "calibrated", tuned_named, tuned_other, [concepts[0]])
        rows[-1]["base_vs_finetuned_psnr"] = closeness(tuned_other, base_other)[0]
    for row in rows:
        row.update({"prompts_per_set": n, "steps": steps, "guidance_scale": guidance_scale})
    return rows


def markdown(rows: list[dict]) -> str:
    concepts = sorted({k.split("_rate_")[0] for r in rows for k in r if "_rate_" in k})
    head = (["setting"] + [f"{c} rate without → with (%)" for c in concepts]
            + ["preserved success without → with (%)", "preserved PSNR (dB)", "preserved SSIM", "identical (%)"]
            + [f"{c} prompts: any object / other attribute kept (%)" for c in concepts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"]]
        for c in concepts:
            cells.append(f"{r[f'{c}_rate_without']} → {r[f'{c}_rate_with']}" if f"{c}_rate_with" in r else "—")
        cells += [f"{r['preserved_success_without']} → {r['preserved_success_with']}", str(r["preserved_psnr"]),
                  str(r["preserved_ssim"]), str(r["preserved_identical_pct"])]
        for c in concepts:
            cells.append(f"{r[f'{c}_object_with']} / {r[f'{c}_other_kept_with']}" if f"{c}_object_with" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
