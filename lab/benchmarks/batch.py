"""N jobs in one `diffedit batch` vs N separate `diffedit` invocations, and batch vs pure compute.

Three numbers from one run on the shipped toy model:
- `separate`: wall time of N `diffedit generate/edit` processes, one after another (each pays the
  interpreter start, imports and the model load);
- `batch`: wall time of one `diffedit batch` process running the same N jobs;
- `compute`: the sampling time the N commands report themselves (their `seconds`), i.e. the work
  that cannot be saved. `batch jobs / compute` is the in-process cost of a job beyond its compute
  (manifest, argument parsing, image I/O, results rows), with the model load left out.

Then, per engine, micro-batching of inversions and edits (`edit_micro_batching`): the same ShapesBench
recolour jobs with `--batch-size 1` and `--batch-size 4`, side by side in one run, their time and how
far the outputs of the two runs differ.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffedit.models import DEFAULT_MODEL
from diffedit.toy.shapes import make_scene


def jobs(n: int, steps: int) -> list[dict]:
    out = []
    for k in range(n):
        if k % 2 == 0:
            out.append({"id": f"gen-{k}", "command": "generate", "prompt": "a red circle on a white background",
                        "seed": k, "steps": steps})
        else:
            out.append({"id": f"edit-{k}", "command": "edit", "image": f"scene-{k}.png", "source": "",
                        "target": "a blue circle on a white background", "steps": steps})
    return out


def argv(job: dict, folder: Path) -> list[str]:
    """The same job as a stand-alone command line."""
    args = [job["command"], job.get("prompt") or str(folder / job["image"])]
    for key, value in job.items():
        if key not in ("id", "command", "prompt", "image"):
            args += ["--" + key.replace("_", "-"), str(value)]
    return args + ["-o", str(folder / "separate" / f"{job['id']}.png"), "--json", "-q"]


def _diffedit(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffedit", *args], capture_output=True, check=True, **kw)


def run(n: int = 8, steps: int = 50) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from PIL import Image

        for k in range(n):
            Image.fromarray(make_scene(k).image).save(folder / f"scene-{k}.png")
        todo = jobs(n, steps)
        (folder / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in todo))
        (folder / "separate").mkdir()

        start = time.perf_counter()
        compute = 0.0
        for job in todo:
            done = _diffedit(argv(job, folder))
            compute += json.loads(done.stdout.decode().splitlines()[-1])["seconds"]
        separate = time.perf_counter() - start

        start = time.perf_counter()
        _diffedit(["batch", str(folder / "jobs.jsonl"), "--out-dir", str(folder / "batch"), "-q"])
        batch = time.perf_counter() - start
        rows = [json.loads(line) for line in (folder / "batch" / "results.jsonl").read_text().splitlines()]
        # the first job pays the model load; the others show the per-job cost in a warm process
        warm = rows[1:]
        warm_jobs = sum(r["seconds"] for r in warm)
        warm_compute = sum(r["metrics"]["seconds"] for r in warm)
        micro = micro_batching(folder, n, steps)
    return {**micro, "model": str(DEFAULT_MODEL.name), "jobs": n, "steps": steps, "separate_s": round(separate, 2),
            "batch_s": round(batch, 2), "separate_over_batch": round(separate / batch, 2),
            "compute_s": round(compute, 2), "batch_jobs_over_compute": round(warm_jobs / warm_compute, 3),
            "batch_over_compute": round(batch / compute, 2)}


def micro_batching(folder: Path, n: int, steps: int, size: int = 4) -> dict:
    """N generate jobs one by one vs `size` per forward: summed job seconds, same warm process kind."""
    gens = [{"id": f"g{k}", "command": "generate", "prompt": "a red circle on a white background", "seed": k,
             "steps": steps} for k in range(n)]
    (folder / "gen.jsonl").write_text("".join(json.dumps(j) + "\n" for j in gens))
    seconds = {}
    for bs in (1, size):
        out = folder / f"micro-{bs}"
        _diffedit(["batch", str(folder / "gen.jsonl"), "--out-dir", str(out), "--batch-size", str(bs), "-q"])
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        seconds[bs] = sum(r["seconds"] for r in rows[size:])  # leave out the group that loaded the model
    return {"micro_batch": size, "micro_speedup": round(seconds[1] / seconds[size], 2)}


EDIT_ENGINES = ("ddim", "ddpm-ef", "bdia", "direct", "infedit")


def edit_micro_batching(engines=EDIT_ENGINES, n: int = 8, size: int = 4, repeats: int = 3) -> list[dict]:
    """Per engine: N inversions and N edits (ShapesBench recolour tasks, each job its own seed) with
    `--batch-size 1` and `size`, at the engine's defaults, the two runs alternated `repeats` times (this
    machine's speed drifts by more than 10 % over minutes; medians of alternated runs drift less). Times are the
    jobs' own seconds (a warm-up job loads the model first); outputs of the two runs are compared:
    records by their largest difference relative to the tensor's largest value, images in levels."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from lab.toy.bench import load_tasks, source_scene

    tasks = [t for t in load_tasks() if t["kind"] == "recolour"][:n]
    forward = _forward_costs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for k, task in enumerate(tasks):
            Image.fromarray(source_scene(task).image).save(folder / f"task-{k}.png")
        for engine in engines:
            todo = [{"id": "warm-up", "command": "generate", "prompt": "a red circle", "steps": 1}]
            todo += [{"id": f"inv-{k}", "command": "invert", "image": f"task-{k}.png", "prompt": t["source_prompt"],
                      "engine": engine, "seed": k, "check": False} for k, t in enumerate(tasks)]
            todo += [{"id": f"edit-{k}", "command": "edit", "image": f"task-{k}.png", "source": t["source_prompt"],
                      "target": t["target_prompt"], "engine": engine, "seed": k} for k, t in enumerate(tasks)]
            manifest = folder / f"{engine}.jsonl"
            manifest.write_text("".join(json.dumps(j) + "\n" for j in todo))
            runs, outputs, network = {1: [], size: []}, {}, {}
            for rep, bs in itertools.product(range(repeats), (1, size)):
                out = folder / f"{engine}-{bs}-{rep}"
                _diffedit(["batch", str(manifest), "--out-dir", str(out), "--batch-size", str(bs), "-q"])
                done = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
                if any(r["status"] != "ok" for r in done):
                    raise RuntimeError(f"{engine}: {[r['error'] for r in done if r['status'] != 'ok']}")
                runs[bs].append({kind: sum(r["seconds"] for r in done if r["id"].startswith(kind)) for kind in ("inv", "edit")})
                if rep:
                    continue
                # the bare network's share: each group's forwards once (its rows report the group's)
                network[bs] = sum(sum(calls * forward(int(rows)) for rows, calls in r["metrics"]["forwards"].items())
                                  / r["metrics"].get("batched", 1) for r in done if r["id"].startswith("edit"))
                outputs[bs] = {r["id"]: out / r["outputs"][0] for r in done if r["id"] != "warm-up"}
            seconds = {bs: {kind: statistics.median(r[kind] for r in paired) for kind in ("inv", "edit")}
                       for bs, paired in runs.items()}
            record_diff, level_diff = 0.0, 0
            for job, one in outputs[1].items():
                many = outputs[size][job]
                if job.startswith("inv"):
                    a, b = load_file(one), load_file(many)
                    record_diff = max(record_diff, *(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
                                                    for k in a if a[k].is_floating_point()))
                else:
                    with Image.open(one) as x, Image.open(many) as y:
                        level_diff = max(level_diff, int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()))
            rows.append({"engine": engine, "jobs": n, "batch_size": size, "repeats": repeats,
                         "invert_1_s": round(seconds[1]["inv"], 2), f"invert_{size}_s": round(seconds[size]["inv"], 2),
                         "edit_1_s": round(seconds[1]["edit"], 2), f"edit_{size}_s": round(seconds[size]["edit"], 2),
                         "invert_ratio": round(seconds[size]["inv"] / seconds[1]["inv"], 3),
                         "edit_ratio": round(seconds[size]["edit"] / seconds[1]["edit"], 3),
                         "network_edit_ratio": round(network[size] / network[1], 3),
                         "record_max_rel_diff": float(f"{record_diff:.2g}"), "image_max_level_diff": level_diff})
    return rows


def _forward_costs():
    """The toy model's bare forward seconds by batch rows (median of 5, measured once per size)."""
    from diffedit.models import load_model
    from lab.benchmarks.engines import forward_seconds

    model, seen = load_model(None), {}

    def cost(rows: int) -> float:
        if rows not in seen:
            seen[rows] = forward_seconds(model, rows, model.default_size()[0])
        return seen[rows]

    return cost


def edits_markdown(rows: list[dict]) -> str:
    size = rows[0]["batch_size"]
    lines = [f"| engine | {rows[0]['jobs']} inversions: batch-size {size} ÷ 1 | {rows[0]['jobs']} edits: batch-size "
             f"{size} ÷ 1 | the same for their bare network forwards | records: largest relative difference "
             "| edited images: largest difference (levels) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['invert_ratio']} ({r[f'invert_{size}_s']} s ÷ {r['invert_1_s']} s) "
                     f"| {r['edit_ratio']} ({r[f'edit_{size}_s']} s ÷ {r['edit_1_s']} s) | {r['network_edit_ratio']} "
                     f"| {r['record_max_rel_diff']} "
                     f"| {r['image_max_level_diff']} |")
    return "\n".join(lines)


def markdown(row: dict) -> str:
    return "\n".join([
        "| jobs | separate processes | one batch | separate ÷ batch | batch ÷ compute | warm job ÷ its compute "
        "| generate, batch-size 1 ÷ batch-size 4 |",
        "|---|---|---|---|---|---|---|",
        f"| {row['jobs']} × {row['steps']} steps ({row['model']}) | {row['separate_s']} s | {row['batch_s']} s "
        f"| {row['separate_over_batch']} | {row['batch_over_compute']} | {row['batch_jobs_over_compute']} "
        f"| {row['micro_speedup']} |",
    ])
