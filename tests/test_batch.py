"""diffedit batch: manifests, failure isolation, safe outputs, kill + resume, accelerate sharding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_subprocess


def write_manifest(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def generate_jobs(model: Path, n: int, steps: int = 4) -> list[dict]:
    return [{"id": f"g{k}", "command": "generate", "prompt": f"a red cat {k}", "steps": steps, "seed": k,
             "height": 32, "width": 32, "model": str(model)} for k in range(n)]


def test_good_jobs_succeed_bad_ones_are_reported(tmp_path, tiny_folder, cli):
    model = tiny_folder("sd1")
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    jobs = [
        {"id": "inv", "command": "invert", "image": "in.png", "prompt": "a cat", "steps": 4, "model": str(model)},
        {"id": "corrupt", "command": "edit", "image": "corrupt.png", "target": "a dog", "steps": 4, "model": str(model)},
        {"id": "missing", "command": "edit", "image": "nope.png", "target": "a dog", "steps": 4, "model": str(model)},
        {"id": "escape", "command": "generate", "prompt": "x", "output": "../escaped.png", "model": str(model)},
        {"id": "../../up", "command": "generate", "prompt": "a cat", "steps": 2, "height": 32, "width": 32,
         "model": str(model)},
        {"id": "typo", "command": "generate", "prompt": "x", "stepz": 3},
    ]
    out = tmp_path / "out"
    code, stdout, err = cli("batch", write_manifest(tmp_path / "m.jsonl", jobs), "--out-dir", out, "-q", "--json")
    assert code == 3
    rows = {r["id"]: r for r in rows_of(out)}
    assert [r["id"] for r in rows_of(out)] == [j["id"] for j in jobs]  # manifest order
    assert rows["inv"]["status"] == "ok" and rows["inv"]["outputs"] == ["inv.inv.safetensors"]
    assert rows["inv"]["metrics"]["latent_max_abs"] >= 0  # the command's own metrics come along
    assert "corrupt.png" in rows["corrupt"]["error"] and "nope.png" in rows["missing"]["error"]
    assert "inside the out dir" in rows["escape"]["error"]
    assert rows["../../up"]["status"] == "ok" and rows["../../up"]["outputs"] == ["_.._up.png"]  # sanitized
    assert "unknown key 'stepz'" in rows["typo"]["error"]
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path.parent / "up.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["_.._up.png", "inv.inv.safetensors", "results.jsonl"]
    assert len(stdout.splitlines()) == len(jobs)  # --json: one row per job on stdout


def test_model_is_loaded_once_and_results_equal_single_commands(tmp_path, tiny_folder, cli, monkeypatch):
    import diffedit.models

    model = tiny_folder("sd1")
    loads = []
    real = diffedit.models.load_model
    monkeypatch.setattr(diffedit.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    code, _, _ = cli("batch", write_manifest(tmp_path / "m.jsonl", generate_jobs(model, 3)), "--out-dir", out, "-q")
    assert code == 0 and len(loads) == 1
    code, _, _ = cli("generate", "a red cat 2", "-n", 4, "--seed", 2, "--height", 32, "--width", 32, "-m", model,
                     "-o", tmp_path / "alone.png", "-q")
    assert code == 0 and np.array_equal(pixels(out / "g2.png"), pixels(tmp_path / "alone.png"))


def test_manifest_errors_stop_before_any_job(tmp_path, cli):
    out = tmp_path / "out"
    dup = write_manifest(tmp_path / "dup.jsonl", [{"id": "a", "command": "generate", "prompt": "x"}] * 2)
    code, _, err = cli("batch", dup, "--out-dir", out)
    assert code == 1 and "dup.jsonl:2" in err and "repeats" in err and not out.exists()
    (tmp_path / "bad.jsonl").write_text('{"command": "generate"}\n[1, 2]\n')
    code, _, err = cli("batch", tmp_path / "bad.jsonl", "--out-dir", out)
    assert code == 1 and "bad.jsonl:2: each line must be a JSON object" in err


def test_manifest_from_stdin_and_rerun_needs_resume(tmp_path, tiny_folder):
    manifest = "".join(json.dumps(j) + "\n" for j in generate_jobs(tiny_folder("sd1"), 2, steps=2))
    out = tmp_path / "out"
    done = run_subprocess(["batch", "-", "--out-dir", out, "--json"], stdin=manifest.encode())
    assert done.returncode == 0, done.stderr.decode()
    assert [json.loads(line)["id"] for line in done.stdout.decode().splitlines()] == ["g0", "g1"]
    again = run_subprocess(["batch", "-", "--out-dir", out], stdin=manifest.encode())
    assert again.returncode == 1 and b"--resume" in again.stderr


def test_sigkill_then_resume_runs_every_job_exactly_once(tmp_path, tiny_folder):
    jobs = generate_jobs(tiny_folder("sd1"), 8, steps=40)
    manifest, out = write_manifest(tmp_path / "m.jsonl", jobs), tmp_path / "out"
    cmd = [sys.executable, "-m", "diffedit", "batch", str(manifest), "--out-dir", str(out), "-q"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 2):
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    first = {r["id"]: r for r in rows_of(out)}
    assert 2 <= len(first) < len(jobs), "the kill should land in the middle of the batch"
    stamps = {i: (out / r["outputs"][0]).stat().st_mtime_ns for i, r in first.items()}

    done = subprocess.run(cmd + ["--resume"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [j["id"] for j in jobs]  # each once, in manifest order
    assert all(r["status"] == "ok" for r in rows)
    assert all((out / first[i]["outputs"][0]).stat().st_mtime_ns == t for i, t in stamps.items())  # not redone
    for row in rows:
        with Image.open(out / row["outputs"][0]) as img:
            img.load()  # a truncated file would raise
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_two_processes_under_accelerate_equal_one(tmp_path, tiny_folder):
    jobs = generate_jobs(tiny_folder("sd1"), 5, steps=3)
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    single = run_subprocess(["batch", manifest, "--out-dir", tmp_path / "one", "-q"])
    assert single.returncode == 0, single.stderr.decode()
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate if accelerate.exists() else shutil.which("accelerate")), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "diffedit", "batch", str(manifest), "--out-dir", str(tmp_path / "two"), "-q"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, capture_output=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")

    def comparable(row):
        return {k: v for k, v in row.items() if k != "seconds"} | {"metrics": {
            k: v for k, v in row["metrics"].items() if k != "seconds"}}

    assert [comparable(r) for r in one] == [comparable(r) for r in two]
    for row in one:  # accelerate runs each rank on one thread: float sums in another order, <= 1 level
        diff = pixels(tmp_path / "one" / row["outputs"][0]) - pixels(tmp_path / "two" / row["outputs"][0])
        assert np.abs(diff).max() <= 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_contact_sheet_shows_inputs_and_outputs(tmp_path, tiny_folder, cli):
    model = tiny_folder("sd1")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "in.png")
    jobs = [{"id": "e", "command": "edit", "image": "in.png", "target": "a dog", "steps": 3, "model": str(model)},
            {"id": "g", "command": "generate", "prompt": "a cat", "steps": 2, "height": 32, "width": 32,
             "model": str(model)}]
    code, _, _ = cli("batch", write_manifest(tmp_path / "m.jsonl", jobs), "--out-dir", tmp_path / "out",
                     "--contact-sheet", tmp_path / "sheet.png", "-q")
    assert code == 0
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (4 + 2 * 132, 4 + 2 * (128 + 14 + 4))  # two rows; the edit has input + output


def test_micro_batches_equal_one_by_one(tmp_path, tiny_folder, cli):
    jobs = generate_jobs(tiny_folder("sd1"), 6, steps=4)
    for job in jobs:
        job["eta"] = 1.0  # stochastic: every row must also draw its step noise from its own seed
    jobs[4]["steps"] = 3  # differs in more than prompt/seed/output: runs apart from its neighbours
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    for size in (1, 4):
        code, _, err = cli("batch", manifest, "--out-dir", tmp_path / f"b{size}", "--batch-size", size, "-q")
        assert code == 0, err
    rows = rows_of(tmp_path / "b4")
    assert [r["metrics"].get("batched", 1) for r in rows] == [4, 4, 4, 4, 1, 1]
    for row in rows:
        diff = pixels(tmp_path / "b1" / row["outputs"][0]) - pixels(tmp_path / "b4" / row["outputs"][0])
        assert np.abs(diff).max() <= 1  # same image up to float rounding in batched matmuls


def test_invert_edit_and_reconstruct_jobs_micro_batch(tmp_path, tiny_folder, cli):
    """Consecutive invert, edit (from images and from records) and reconstruct jobs share forwards;
    every output is the one-by-one output (records to float rounding, images within 1 level)."""
    from safetensors.torch import load_file

    model = str(tiny_folder("sd1"))
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"in{k}.png")
    common = {"steps": 4, "model": model, "engine": "ddpm-ef"}
    jobs = [{"id": f"inv{k}", "command": "invert", "image": f"in{k}.png", "prompt": f"a red cat {k}", "seed": k,
             **common} for k in range(3)]
    jobs += [{"id": f"edit{k}", "command": "edit", "image": f"in{k}.png", "source": "a red cat", "target": "a blue cat",
              "seed": k, **common} for k in range(3)]
    jobs += [{"id": "masked", "command": "edit", "image": "in0.png", "target": "a dog", "mask": "in1.png", **common}]
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    for size in (1, 4):
        code, _, err = cli("batch", manifest, "--out-dir", tmp_path / f"b{size}", "--batch-size", size, "-q")
        assert code == 0, err
    follow = [{"id": f"from{k}", "command": "edit", "from": f"b4/inv{k}.inv.safetensors", "target": "a blue dog",
               "model": model} for k in range(3)]
    follow += [{"id": f"rec{k}", "command": "reconstruct", "record": f"b4/inv{k}.inv.safetensors", "model": model}
               for k in range(3)]
    manifest = write_manifest(tmp_path / "m2.jsonl", follow)
    for size in (1, 4):
        code, _, err = cli("batch", manifest, "--out-dir", tmp_path / f"c{size}", "--batch-size", size, "-q")
        assert code == 0, err
    rows = rows_of(tmp_path / "b4") + rows_of(tmp_path / "c4")
    assert [r["metrics"].get("batched", 1) for r in rows] == [3] * 6 + [1] + [3] * 6
    for row in rows:
        out = row["outputs"][0]
        folder = "b" if row["id"] in {j["id"] for j in jobs} else "c"
        one, many = tmp_path / f"{folder}1" / out, tmp_path / f"{folder}4" / out
        if out.endswith(".safetensors"):
            a, b = load_file(one), load_file(many)
            assert all(float((a[k] - b[k]).abs().max()) <= 1e-5 * max(1.0, float(a[k].abs().max())) for k in a)
        else:
            assert np.abs(pixels(one) - pixels(many)).max() <= 1


def test_a_job_that_runs_out_of_memory_fails_alone(tmp_path, tiny_folder):
    """A real allocation failure: the batch runs with its data segment capped (RLIMIT_DATA), so a
    4096² generate job cannot get its activations while 32² jobs can: the big job fails alone, named as
    out of memory, and the batch goes on."""
    import resource

    model = str(tiny_folder("sd1"))
    jobs = generate_jobs(Path(model), 3, steps=2)
    jobs[1].update(height=4096, width=4096)
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    cap = 3 * 2**30

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    for size in (1, 3):
        cmd = [sys.executable, "-c", "from diffedit.cli.main import main; main()", "batch", str(manifest),
               "--out-dir", str(tmp_path / f"b{size}"), "--batch-size", str(size), "-q"]
        done = subprocess.run(cmd, capture_output=True, timeout=300, preexec_fn=limit)
        assert done.returncode == 3, done.stderr.decode()[-500:]
        rows = rows_of(tmp_path / f"b{size}")
        assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
        assert rows[1]["error"].startswith("out of memory") and "traceback" not in rows[1]["error"]


def test_a_micro_batch_that_fails_reruns_job_by_job(tmp_path, tiny_folder, cli):
    """One corrupt image in a group of three inversions: the group fails, each job runs alone, and only
    the corrupt one fails, with its own message."""
    model = str(tiny_folder("sd1"))
    for k in (0, 2):
        Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)).save(tmp_path / f"in{k}.png")
    (tmp_path / "in1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    jobs = [{"id": f"inv{k}", "command": "invert", "image": f"in{k}.png", "prompt": "a cat", "steps": 3,
             "model": model} for k in range(3)]
    code, _, _ = cli("batch", write_manifest(tmp_path / "m.jsonl", jobs), "--out-dir", tmp_path / "out",
                     "--batch-size", 3, "-q")
    rows = rows_of(tmp_path / "out")
    assert code == 3 and [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "in1.png" in rows[1]["error"] and "batched" not in rows[0]["metrics"]


def test_move_jobs_micro_batch(tmp_path, tiny_folder, cli):
    model = str(tiny_folder("sd1"))
    rng = np.random.default_rng(1)
    jobs = []
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"in{k}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + 4 * k : 14 + 4 * k, 6:16] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{k}.png")
        jobs.append({"id": f"move{k}", "command": "move", "image": f"in{k}.png", "mask": f"mask{k}.png", "dx": 4 + k,
                     "dy": -2, "seed": k, "steps": 3, "model": model})
    manifest = write_manifest(tmp_path / "m.jsonl", jobs)
    for size in (1, 3):
        code, _, err = cli("batch", manifest, "--out-dir", tmp_path / f"b{size}", "--batch-size", size, "-q")
        assert code == 0, err
    rows = rows_of(tmp_path / "b3")
    assert [r["metrics"].get("batched", 1) for r in rows] == [3, 3, 3]
    for row in rows:
        out = row["outputs"][0]
        assert np.abs(pixels(tmp_path / "b1" / out) - pixels(tmp_path / "b3" / out)).max() <= 1


def test_generate_images_rows_equal_lone_runs(tiny):
    import torch

    from diffedit.images import to_tensor
    from diffedit.jobs import generate_image, generate_images

    _, model = tiny("sd1")
    together = generate_images(model, ["a red cat", "a blue house", "a cat"], [3, 4, 5], steps=5, eta=0.5,
                               height=32, width=32)
    for (img, result), prompt, seed in zip(together, ["a red cat", "a blue house", "a cat"], [3, 4, 5]):
        alone, _ = generate_image(model, prompt, seed=seed, steps=5, eta=0.5, height=32, width=32)
        assert result["batched"] == 3 and result["seed"] == seed
        assert torch.allclose(to_tensor(img), to_tensor(alone), atol=2 / 255)
