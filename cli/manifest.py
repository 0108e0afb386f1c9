"""Batch jobs: a JSONL manifest of CLI commands run in one process, resumable, shardable. It lives in
the CLI layer because it runs the commands themselves.

Each manifest line is one job for any `diffedit` command, its keys the command's argument and option
names (dashes as underscores). A job is turned into the command line it stands for and run in
process through the CLI itself, so every command and option works in a manifest with the same
checks and messages, and new commands need no change here. The model is loaded once: the CLI's
`load` reuses models while a batch runs.

Safety: outputs always land inside the out dir under sanitized names; outputs are written atomically
by the commands themselves; a result row is appended (and flushed to disk) only after the job's
outputs are complete, so a batch killed at any moment resumes with every job done exactly once.

Scale-out: under `accelerate launch` or `torchrun` (RANK / WORLD_SIZE in the environment) rank r
runs jobs r, r + W, r + 2W, ... and writes `results.rank<r>.jsonl`; the last rank to finish merges
them into `results.jsonl` in manifest order.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffedit.errors import DiffeditError, UsageError

RESULTS = "results.jsonl"
# Keys whose values are input paths, resolved against the manifest's folder.
INPUT_KEYS = ("image", "record", "from", "model_config", "mask", "adapter")
# Keys whose values are outputs: always inside the out dir.
OUTPUT_KEYS = ("output", "show_attention", "show_mask", "json_out")
# Options the batch sets itself.
RESERVED = ("json", "quiet", "overwrite")
DEFAULT_SUFFIX = {"invert": ".inv.safetensors"}
NOT_BATCHABLE = ("batch", "bench", "erase", "models", "toy")


@dataclass
class Job:
    index: int  # position in the manifest (0-based, blank lines not counted)
    line: int  # line number in the manifest file, for messages
    id: str
    command: str
    spec: dict
    argv: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    image: Path | None = None  # the input image, for the contact sheet
    params: dict | None = None  # the command's parsed parameters, when it runs in a micro-batch
    error: str | None = None  # a job that cannot even be built fails without running


def read_manifest(source: str) -> tuple[list[dict], Path, str]:
    """The manifest's objects with their line numbers, its base folder for relative paths, its name."""
    if source == "-":
        import sys

        text, base, name = sys.stdin.read(), Path.cwd(), "<stdin>"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DiffeditError(f"{path}: no such manifest file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DiffeditError(f"{path}: cannot read the manifest ({e})") from None
        base, name = path.resolve().parent, str(path)
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DiffeditError(f"{name}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DiffeditError(f"{name}:{number}: each line must be a JSON object")
        entries.append({"line": number, "spec": obj})
    if not entries:
        raise DiffeditError(f"{name}: the manifest holds no jobs")
    return entries, base, name


def safe_name(text: str) -> str:
    """A file name from any text: letters, digits, dot, dash and underscore; never hidden or empty."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return name[:120] or "_"


def plan(entries: list[dict], base: Path, out_dir: Path, manifest: str) -> list[Job]:
    """Turn manifest entries into jobs (argv and outputs); per-job problems become job errors."""
    from diffedit.cli.main import commands

    available = commands()
    jobs, names = [], {}  # file name -> id
    for index, entry in enumerate(entries):
        spec = dict(entry["spec"])
        raw_id = spec.pop("id", None)
        job_id = str(raw_id) if raw_id is not None else f"job-{entry['line']}"
        name = safe_name(job_id)
        if name in names:  # the same id, or ids whose sanitized file names collide
            raise DiffeditError(f"{manifest}:{entry['line']}: id {job_id!r} repeats (or names the same files as) "
                                f"{names[name]!r}")
        names[name] = job_id
        job = Job(index, entry["line"], job_id, str(spec.pop("command", "")), spec)
        try:
            if job.command not in available or job.command in NOT_BATCHABLE:
                raise UsageError(f"unknown command {job.command!r}; batch runs {', '.join(c for c in available if c not in NOT_BATCHABLE)}")
            job.argv, job.outputs = _command_line(job, available[job.command], base, out_dir.resolve(), name)
            job.image = base / str(spec["image"]) if spec.get("image") else None
        except DiffeditError as e:
            job.error = str(e)
        jobs.append(job)
    _refuse_shared_outputs(jobs)
    return jobs


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    """Two jobs writing one file would both report ok and one result would be lost: both fail."""
    owners: dict[Path, Job] = {}
    for job in jobs:
        for path in job.outputs:
            other = owners.setdefault(path, job)
            if other is not job:
                message = f"output {path.name} is also written by job {{}}; give each job its own output"
                job.error = job.error or message.format(repr(other.id))
                other.error = other.error or message.format(repr(job.id))


def _command_line(job: Job, command, base: Path, out_dir: Path, name: str) -> tuple[list[str], list[Path]]:
    params = {}
    for p in command.params:  # a key is the parameter's name or its long option without dashes
        params[p.name] = p
        for opt in p.opts:
            if opt.startswith("--"):
                params[opt[2:].replace("-", "_")] = p
    spec = dict(job.spec)
    for key in RESERVED:
        if key in spec:
            raise UsageError(f"key {key!r} is set by batch itself")
    if "output" not in spec and "output" in params:
        spec["output"] = name + DEFAULT_SUFFIX.get(job.command, ".png")
    positional, options, outputs = [], [], []
    for key, value in spec.items():
        p = params.get(key)
        if p is None:
            raise UsageError(f"unknown key {key!r} for {job.command}")
        if key in OUTPUT_KEYS:
            value = str(inside(out_dir, value, key))
            outputs.append(Path(value))
        elif key in INPUT_KEYS or (key == "model" and (base / str(value)).exists()):
            if value == "-" or (isinstance(value, list) and "-" in value):
                raise UsageError(f"{key}: '-' (stdin) cannot be used in a batch")
            value = [str(base / str(v)) for v in value] if isinstance(value, list) else str(base / str(value))
        if p.param_type_name == "argument":
            positional.append(str(value))
        elif getattr(p, "is_flag", False) and p.secondary_opts:  # --check/--no-check
            options.append(p.opts[0] if value else p.secondary_opts[0])
        elif getattr(p, "is_flag", False):
            if value:
                options.append(p.opts[0])
        else:
            for item in value if isinstance(value, list) else [value]:
                options += [p.opts[0], str(item)]
    argv = [job.command, *options, "--json", "--quiet"]
    if "overwrite" in params:  # files are checked against the batch's ledger before the job runs
        argv.append("--overwrite")
    return [*argv, "--", *positional], outputs  # after "--": a prompt like "-a cat" is not an option


def ledger(out_dir: Path) -> set[str]:
    """Outputs (relative to the out dir) that this batch's runs wrote, from every results file."""
    written = set()
    for path in [out_dir / RESULTS, *sorted(out_dir.glob("results.rank*.jsonl"))]:
        for row in read_rows(path):
            outputs = row.get("outputs")
            written.update(o for o in outputs if isinstance(o, str)) if isinstance(outputs, list) else None
    return written


def refuse_foreign_files(jobs: list[Job], out_dir: Path, overwrite: bool) -> None:
    """A job whose output exists but was not written by a run of this batch fails instead of replacing
    it (unless the batch runs with --overwrite)."""
    if overwrite:
        return
    written = ledger(out_dir)
    for job in jobs:
        for path in job.outputs:
            if job.error is None and path.exists() and str(path.relative_to(out_dir.resolve())) not in written:
                job.error = f"{path}: already exists and was not written by this batch; pass --overwrite to replace it"


LOCK = ".diffedit-batch.lock"


def _reserved(name: str) -> bool:
    """The batch's own bookkeeping files, which no job may write."""
    return name == RESULTS or name == LOCK or re.fullmatch(r"results\.rank\d+\.jsonl|\.rank\d+\.done|\.merge\.lock",
                                                           name) is not None


def inside(out_dir: Path, value, key: str) -> Path:
    """`value` as a path inside `out_dir`; anything that would leave it, or name the batch's own
    bookkeeping files, is refused."""
    rel = Path(str(value))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise UsageError(f"{key} {str(value)!r} must be a relative path inside the out dir")
    if len(rel.parts) == 1 and _reserved(safe_name(rel.parts[0])):
        raise UsageError(f"{key} {str(value)!r} is a file the batch keeps for itself; choose another name")
    path = out_dir.joinpath(*(safe_name(part) for part in rel.parts))
    if not path.resolve().is_relative_to(out_dir):  # e.g. through a symlink already in the out dir
        raise UsageError(f"{key} {str(value)!r} leads outside the out dir")
    return path


# -- running -------------------------------------------------------------------------------------------


def shard() -> tuple[int, int]:
    """(rank, world size) under accelerate launch / torchrun; (0, 1) otherwise."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise DiffeditError("RANK / WORLD_SIZE in the environment are not integers") from None
    if not 0 <= rank < world:
        raise DiffeditError(f"RANK {rank} is not below WORLD_SIZE {world}")
    return rank, world


def results_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a line cut short by a kill (or not a row at all) is ignored."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                rows.append(row)
    return rows


def finished(out_dir: Path) -> dict[str, dict]:
    """Rows of jobs already done: status ok and every output present."""
    done = {}
    for path in [out_dir / RESULTS, *sorted(out_dir.glob("results.rank*.jsonl"))]:
        for row in read_rows(path):
            if row.get("status") == "ok" and all(Path(out_dir, o).exists() for o in row.get("outputs", [])):
                done[row["id"]] = row
    return done


def result_row(job: Job, out_dir: Path, seconds: float, *, error: str | None = None,
               metrics: dict | None = None) -> dict:
    """A job's results row: failed with its error, or ok with its outputs and the command's metrics."""
    outputs = [] if error else [str(p.relative_to(out_dir.resolve())) for p in job.outputs if p.exists()]
    metrics = {} if error else {k: v for k, v in (metrics or {}).items() if k != "output"}
    return {"id": job.id, "line": job.line, "command": job.command, "status": "failed" if error else "ok",
            "outputs": outputs, "seconds": round(seconds, 4), "error": error, "metrics": metrics}


def _make_output_folders(jobs: list[Job]) -> None:
    for job in jobs:
        for path in job.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)


def run_job(job: Job, out_dir: Path) -> dict:
    """Run one job through the CLI in process; its result row (never raises for the job's own failure)."""
    from diffedit.cli.main import run

    start = time.perf_counter()
    if job.error is not None:
        return result_row(job, out_dir, 0.0, error=job.error)
    _make_output_folders([job])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = run(job.argv)
        except Exception as e:  # e.g. out of memory: the job fails, the batch goes on
            code, stderr = 1, io.StringIO(f"error: {type(e).__name__}: {e}")
    seconds = time.perf_counter() - start
    if code != 0:
        return result_row(job, out_dir, seconds, error=one_line_error(stderr.getvalue(), code))
    metrics = {}
    for line in stdout.getvalue().splitlines():  # the command's --json result
        with contextlib.suppress(json.JSONDecodeError):
            metrics.update(json.loads(line))
    return result_row(job, out_dir, seconds, metrics=metrics)


def parse_params(job: Job) -> dict | None:
    """The job's parameters as its command function receives them (None if they do not parse)."""
    from diffedit.cli.main import commands

    try:
        with commands()[job.command].make_context(job.command, list(job.argv[1:])) as ctx:
            return dict(ctx.params)
    except Exception:  # the job runs alone and reports its own usage error
        return None


def group_key(job: Job):
    """Jobs with equal keys can share a micro-batch; None: the job runs alone."""
    from diffedit.cli.common import BATCHED

    entry = BATCHED.get(job.command)
    if job.error is not None or entry is None:
        return None
    _, varying, qualifies = entry
    job.params = parse_params(job)
    kind = None if job.params is None else qualifies(job.params)  # False: alone; else part of the key
    if not kind:
        return None
    return job.command, kind, tuple(sorted((k, repr(v)) for k, v in job.params.items() if k not in varying))


def micro_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Consecutive jobs that can share a batch, at most `size` per group (manifest order kept)."""
    groups, key = [], None
    for job in jobs:
        new_key = group_key(job) if size > 1 else None
        if groups and new_key is not None and new_key == key and len(groups[-1]) < size:
            groups[-1].append(job)
        else:
            groups.append([job])
            key = new_key
    return groups


def run_group(group: list[Job], out_dir: Path) -> list[dict]:
    """One micro-batch through the command's batched runner; on any error each job runs alone."""
    from diffedit.cli.common import BATCHED

    if len(group) == 1:
        return [run_job(group[0], out_dir)]
    start = time.perf_counter()
    _make_output_folders(group)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            results = BATCHED[group[0].command][0]([job.params for job in group])
        except Exception:  # e.g. one output not writable: let each job find and report its own problem
            results = None
    if results is None:
        return [run_job(job, out_dir) for job in group]
    seconds = (time.perf_counter() - start) / len(group)  # the batch's time, shared
    return [result_row(job, out_dir, seconds, metrics=result) for job, result in zip(group, results)]


def one_line_error(text: str, code: int) -> str:
    """The CLI's error line, or the text of a usage-error panel, as one line."""
    lines = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines()]
    errors = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    lines = [ln for ln in lines if ln and not ln.startswith(("Usage:", "Try ", "Error"))]
    return " ".join(lines) or f"exit code {code}"


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace a results file at once (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def run_batch(jobs: list[Job], out_dir: Path, *, resume: bool, batch_size: int = 1, overwrite: bool = False,
              on_row: Callable[[dict, bool], None] | None = None) -> tuple[list[dict], Path | None]:
    """Run this rank's share of `jobs`; returns its rows (skipped ones included) and the merged file.

    `on_row(row, skipped)` is called after each job. Without `resume`, existing results in the out dir
    are an error (nothing is silently redone or lost). With `batch_size` > 1, consecutive jobs of a
    command that supports it (generate) and equal but for prompt, seed and output share forwards.
    Outputs that exist but were not written by a run of this batch are not replaced without `overwrite`.
    """
    rank, world = shard()
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_dir_lock(out_dir, rank):
        return _run_locked(jobs, out_dir, rank, world, resume, batch_size, overwrite, on_row)


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, rank: int):
    """An exclusive lock on the out dir for one batch process (per rank): a second process fails at
    once, naming the holder's PID. The kernel drops the lock when its holder dies (a file left by a
    killed batch locks nothing); a finished batch removes the file."""
    import fcntl

    path = out_dir / (LOCK if rank == 0 else f"{LOCK}.{rank}")
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DiffeditError(f"{out_dir}: another batch (PID {holder}) is running on this out dir") from None
        try:  # the file may have been removed by a finishing holder between our open and our lock
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one locks a file about to vanish
        handle.close()


def _run_locked(jobs, out_dir, rank, world, resume, batch_size, overwrite, on_row):
    from diffedit.cli.common import reuse_models

    done = finished(out_dir) if resume else {}
    if resume and world == 1:  # temporary files of writes a kill interrupted (others' may be live)
        for tmp in out_dir.rglob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    path = results_path(out_dir, rank, world)
    if not resume and any(p.exists() for p in {out_dir / RESULTS, path}):  # not other ranks' new files
        raise DiffeditError(f"{out_dir}: holds results of an earlier batch; pass --resume to continue it or choose another --out-dir")
    mine = [job for job in jobs if job.index % world == rank]
    refuse_foreign_files([job for job in mine if job.id not in done], out_dir, overwrite)
    kept = [done[job.id] for job in mine if job.id in done]
    write_rows(path, kept)  # rows of jobs that will rerun are dropped: every id once
    (out_dir / f".rank{rank}.done").unlink(missing_ok=True)
    by_id = dict(done)
    for row in kept:
        if on_row:
            on_row(row, True)
    with reuse_models():
        for group in micro_batches([job for job in mine if job.id not in done], batch_size):
            for row in run_group(group, out_dir):
                append_row(path, row)
                by_id[row["id"]] = row
                if on_row:
                    on_row(row, False)
    return [by_id[job.id] for job in mine], finish(jobs, out_dir, rank, world)


def finish(jobs: list[Job], out_dir: Path, rank: int, world: int) -> Path | None:
    """Mark this rank done; the rank that completes the set merges all rows in manifest order."""
    if world == 1:
        merge(jobs, out_dir, [out_dir / RESULTS])
        return out_dir / RESULTS
    (out_dir / f".rank{rank}.done").write_text("")
    if not all((out_dir / f".rank{r}.done").exists() for r in range(world)):
        return None
    try:  # only one rank merges
        os.close(os.open(out_dir / ".merge.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    try:
        parts = [results_path(out_dir, r, world) for r in range(world)]
        merge(jobs, out_dir, parts)
        for r, part in enumerate(parts):
            part.unlink(missing_ok=True)
            (out_dir / f".rank{r}.done").unlink(missing_ok=True)
    finally:
        (out_dir / ".merge.lock").unlink(missing_ok=True)
    return out_dir / RESULTS


def merge(jobs: list[Job], out_dir: Path, parts: list[Path]) -> None:
    rows = {}
    for part in parts:
        for row in read_rows(part):
            rows[row["id"]] = row
    order = [job.id for job in jobs]
    write_rows(out_dir / RESULTS, [rows[i] for i in order if i in rows])
