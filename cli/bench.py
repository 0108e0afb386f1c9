"""`diffedit bench ...`: benchmarks measured side by side in one run (see benchmarks/)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import DecoderInversionOpt, JsonOpt, LcmLoraOpt, LoraOpt, stderr
from diffedit.cli.main import app

bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


RepeatsOpt = Annotated[int, typer.Option(min=1, help="Interleaved repetitions; medians are reported.")]
SaveOpt = Annotated[Path | None, typer.Option(help="Folder for results.json and results.md.")]
TasksOpt = Annotated[Path | None, typer.Option("--tasks", help="ShapesBench task file (default samples/shapesbench.jsonl; samples/shapesbench-heldout.jsonl asks the same kinds of edit on scenes nothing was tuned on).")]


def _measured(bench, repeats: int, quick: bool, save: Path | None, json: bool) -> None:
    """Run a benchmark module whose `run(repeats, quick)` gives rows for its `markdown`, and report."""
    with stderr.status("measuring"):
        rows = bench.run(repeats=repeats, quick=quick)
    _report(rows, bench.markdown(rows), save, json)


def _results_folder(save: Path) -> None:
    """Create a results folder and record in it the command that fills it (`command.json`), so a table
    can be measured again as it was."""
    from diffedit.cli import main

    save.mkdir(parents=True, exist_ok=True)
    (save / "command.json").write_text(jsonlib.dumps({"command": main.invoked}) + "\n")


def _report(rows: list[dict], table: str, save: Path | None, json: bool, printed: list[dict] | None = None) -> None:
    """Save rows and table under `save`; print the table, or with --json the `printed` rows (default: rows)."""
    if save is not None:
        _results_folder(save)
        (save / "results.json").write_text(jsonlib.dumps(rows, indent=2) + "\n")
        (save / "results.md").write_text(table + "\n")
    typer.echo("\n".join(jsonlib.dumps(r) for r in (rows if printed is None else printed)) if json else table)


@bench_app.command("overhead")
def overhead(
    repeats: RepeatsOpt = 5,
    quick: Annotated[bool, typer.Option(help="Tiny model only, 20 steps.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Our generate loop vs NFE x bare forward, and vs diffusers' StableDiffusionPipeline.

    Example: diffedit bench overhead --save benchmarks/results/overhead
    """
    from lab.benchmarks import overhead as bench

    _measured(bench, repeats, quick, save, json)


@bench_app.command("shapes")
def shapes(
    engine: Annotated[list[str], typer.Option("--engine", "-e", help="Engine(s) to run (repeatable).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Default: the shipped toy model.")] = None,
    lora: LoraOpt = None, lcm_lora: LcmLoraOpt = None, decoder_inversion: DecoderInversionOpt = None,
    kinds: Annotated[str | None, typer.Option(help="Comma-separated task kinds (recolour,reshape,move,reconstruct).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks of each chosen kind.")] = None,
    tasks: TasksOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", "-n")] = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g")] = None,
    inversion_guidance_scale: Annotated[float | None, typer.Option("--inversion-guidance-scale")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Engine parameter KEY=VALUE (JSON value), repeatable.")] = None,
    adaptive_guidance: Annotated[float | None, typer.Option("--adaptive-guidance", help="Text edits: adaptive guidance on the regeneration (ddim, rf-inversion).")] = None,
    deepcache: Annotated[int | None, typer.Option("--deepcache", help="Text edits: DeepCache interval on the regeneration (ddim, rf-inversion).")] = None,
    mask: Annotated[str | None, typer.Option("--mask", help="Text edits with an edit mask: object (the object's own region, as a drawn mask file) or words (--mask-from-prompt with its colour and shape).")] = None,
    paste_back: Annotated[bool, typer.Option("--paste-back/--no-paste-back", help="With --mask: the input's pixels outside it.")] = True,
    mask_dilate: Annotated[int | None, typer.Option("--mask-dilate", help="With --mask words: grow the mask by PX pixels.")] = None,
    save: Annotated[Path | None, typer.Option(help="Folder for rows.jsonl, results.json and results.md.")] = None,
    json: JsonOpt = False,
):
    """ShapesBench: edit success by the checker and preservation outside the edit, per engine.

    Example: diffedit bench shapes -e ddim -e ddpm-ef --kinds recolour,reshape
    """
    from diffedit.cli.common import load
    from diffedit.errors import UsageError
    from lab.toy import bench

    params = {}
    for item in param or []:
        key, _, value = item.partition("=")
        try:
            params[key.strip().replace("-", "_")] = jsonlib.loads(value)
        except ValueError:
            raise UsageError(f"--param {item!r}: expected KEY=JSON_VALUE, e.g. skip=10") from None
    m = load(model, "auto", "auto", False, None, loras=lora, lcm_lora=lcm_lora, decoder_inversion=decoder_inversion)
    options = {"steps": steps, "guidance_scale": guidance_scale, "inversion_guidance_scale": inversion_guidance_scale,
               "params": params}
    if mask not in (None, "object", "words"):
        raise UsageError(f"--mask {mask!r}: object or words")
    options.update(mask=mask, paste_back=paste_back, mask_dilate=mask_dilate)
    accelerators = {"adaptive_guidance": adaptive_guidance, "deepcache": deepcache}
    options.update({k: v for k, v in accelerators.items() if v is not None})  # text edits take them
    rows = []
    if save is not None:
        _results_folder(save)
        (save / "rows.jsonl").write_text("")

    def progress(row):  # rows are kept as they come, so a long run that stops loses nothing
        if save is not None:
            with open(save / "rows.jsonl", "a") as f:
                f.write(jsonlib.dumps(row) + "\n")

    with stderr.status("running ShapesBench"):
        for name in engine:
            rows += bench.run(m, name, kinds=kinds.split(",") if kinds else None, limit=limit, options=options,
                              tasks_path=tasks or bench.TASKS, progress=progress)
    summary = bench.summarize(rows)
    _report(summary, bench.markdown(summary), save, json, printed=rows)  # --json: the raw rows


@bench_app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Folders saved by `diffedit bench shapes --save` on the same tasks; each is compared with the next.")],
    save: Annotated[Path | None, typer.Option(help="Folder for results.json and results.md.")] = None,
    json: JsonOpt = False,
):
    """ShapesBench runs compared task by task: success and background PSNR differences with 95 %
    intervals (paired bootstrap over the tasks); > or < where the interval excludes zero, ≈ where not.

    Example: diffedit bench compare benchmarks/results/v4-shapes40-ddim-p2p benchmarks/results/v4-shapes40-ddim
    """
    from diffedit.errors import UsageError
    from lab.toy import paired

    if len(runs) < 2:
        raise UsageError("bench compare: give at least two result folders")
    try:
        rows = paired.compare_folders(runs)
    except (OSError, ValueError) as e:  # a folder that is no run, or runs of different tasks
        raise UsageError(str(e)) from None
    _report(rows, paired.markdown(rows), save, json)


@bench_app.command("vae")
def vae(
    model: Annotated[str, typer.Option("--model", "-m")] = "samples/toy-sd",
    decoder_inversion: Annotated[list[int] | None, typer.Option("--decoder-inversion", min=0, max=1000, help="Decoder-inversion steps per encoded image; repeatable, one row each (default: 0 and 50).")] = None,
    quick: Annotated[bool, typer.Option(help="10 scenes and 1 per plain colour instead of 100 and 8: a look, not the measure.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """The VAE's round trip per decoder-inversion setting: PSNR on 100 world scenes and 8 photos, the
    background error of scenes put on 16 plain colours, and the encode's time against the plain encoder's.

    Example: diffedit bench vae --decoder-inversion 0 --decoder-inversion 50 --save benchmarks/results/v3-vae
    """
    from diffedit.models import load_model
    from lab.toy.quality import vae_markdown, vae_report

    m = load_model(model, device="cpu")
    rows = []
    with stderr.status("measuring"):
        for steps in decoder_inversion or [0, 50]:
            m.decoder_inversion = steps
            rows.append({"model": model, **vae_report(m, quick), **({"quick": True} if quick else {})})
    _report(rows, vae_markdown(rows), save, json)


@bench_app.command("toy-quality")
def toy_quality(
    model: Annotated[str, typer.Option("--model", "-m")] = "samples/toy-sd",
    n: Annotated[int, typer.Option(help="Number of seeded prompts.")] = 200,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    json: JsonOpt = False,
):
    """The toy model's quality report (same as `diffedit toy quality`).

    Example: diffedit bench toy-quality
    """
    from lab.toy.quality import report

    with stderr.status("measuring"):
        result = report(model, n=n, guidance_scale=guidance_scale)
    typer.echo(jsonlib.dumps(result) if json else "\n".join(f"{k}: {v}" for k, v in result.items()))


@bench_app.command("engines")
def engines(
    repeats: Annotated[int, typer.Option(min=1, help="Repetitions; medians are reported.")] = 3,
    quick: Annotated[bool, typer.Option(help="Tiny model, 10 steps.")] = False,
    flow_only: Annotated[bool, typer.Option("--flow-only", help="Only the flow engines, on the mid-size SD3.")] = False,
    cpu_time: Annotated[bool, typer.Option("--cpu-time", help="One thread, timed in CPU time (for a busy machine).")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Each engine's invert/edit time vs its network forwards; EF-DDPM vs diffusers' LEDITS++.

    Example: diffedit bench engines --save benchmarks/results/engines
    """
    from lab.benchmarks import engines as bench
    from lab.benchmarks.overhead import use_cpu_time

    if cpu_time:
        use_cpu_time()
    with stderr.status("measuring"):
        rows, comparison = bench.run(repeats=repeats, quick=quick, flow_only=flow_only)
    _report(rows + comparison, bench.markdown(rows, comparison), save, json)


@bench_app.command("docs")
def docs():
    """Write docs/benchmarks.md from the tables in benchmarks/results (run from the repository root).

    Example: diffedit bench docs
    """
    from lab.benchmarks import docs as generator

    typer.echo(str(generator.write()))


@bench_app.command("masks")
def masks(
    repeats: RepeatsOpt = 5,
    quick: Annotated[bool, typer.Option(help="Tiny models, 10 steps.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Masked edit time ÷ the same edit unmasked, every engine, side by side.

    Example: diffedit bench masks --save benchmarks/results/masks
    """
    from lab.benchmarks import masks as bench

    _measured(bench, repeats, quick, save, json)


@bench_app.command("solvers")
def solvers(
    scenes: Annotated[int, typer.Option(min=1, help="ShapesBench reconstruction scenes per point.")] = 10,
    quick: Annotated[bool, typer.Option(help="2 scenes, 5 and 10 steps.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Round-trip PSNR against network evaluations: DDIM, DPM-Solver++ 2M, Euler (each also with a
    fixed-point inversion), RF-Solver, FireFlow on the toy models; with --save, also a plot (round-trip.png).

    Example: diffedit bench solvers --save benchmarks/results/solvers
    """
    from diffedit.errors import UsageError
    from lab.benchmarks import solvers as bench

    with stderr.status("measuring"):
        rows = bench.run(scenes=scenes, quick=quick)
    _report(rows, bench.markdown(rows), save, json)
    if save is not None:
        try:
            bench.plot(rows, save / "round-trip.png")
        except ImportError:
            raise UsageError("the plot needs matplotlib: pip install -e '.[lab]'") from None


@bench_app.command("speed")
def speed(
    repeats: RepeatsOpt = 3,
    quick: Annotated[bool, typer.Option(help="Tiny SD1 at 32², 10 steps.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """One table: every command x engine, seconds, NFE, ÷ its network passes, ÷ diffusers' pipeline.

    Example: diffedit bench speed --save benchmarks/results/speed
    """
    from lab.benchmarks import speed as bench

    _measured(bench, repeats, quick, save, json)


@bench_app.command("move")
def move(
    repeats: RepeatsOpt = 5,
    quick: Annotated[bool, typer.Option(help="Toy model only.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """`diffedit move` (PixelMan) vs the time of its network passes alone.

    Example: diffedit bench move --save benchmarks/results/move
    """
    from lab.benchmarks import move as bench

    _measured(bench, repeats, quick, save, json)


@bench_app.command("guidance")
def guidance(
    repeats: RepeatsOpt = 3,
    quick: Annotated[bool, typer.Option(help="Tiny model, 10 steps.")] = False,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Cost of CFG++, PAG and FK steering relative to CFG, and ours vs diffusers' PAG pipeline.

    Example: diffedit bench guidance --save benchmarks/results/guidance
    """
    from lab.benchmarks import guidance as bench

    _measured(bench, repeats, quick, save, json)


@bench_app.command("fk-toy")
def fk_toy(
    model: Annotated[str, typer.Option("--model", "-m")] = "samples/toy-sd",
    n: Annotated[int, typer.Option(help="Number of seeded prompts.")] = 50,
    particles: Annotated[int, typer.Option(help="FK particles K.")] = 4,
    json: JsonOpt = False,
):
    """FK steering with the checker reward on the toy model: success with K particles vs K = 1.

    Example: diffedit bench fk-toy --n 50 --particles 4
    """
    from diffedit.models import load_model
    from lab.toy.quality import fk_success

    with stderr.status("measuring"):
        result = fk_success(load_model(model, device="cpu"), n=n, particles=particles)
    typer.echo(jsonlib.dumps(result) if json else "\n".join(f"{k}: {v}" for k, v in result.items()))


@bench_app.command("batch")
def batch(
    n: Annotated[int, typer.Option(min=2, help="Number of jobs (half generate, half edit).")] = 8,
    steps: Annotated[int, typer.Option(min=1)] = 50,
    engines: Annotated[str, typer.Option(help="Engines whose inversions and edits are micro-batched ('' for none).")] = "ddim,ddpm-ef,bdia,direct,infedit",
    repeats: Annotated[int, typer.Option(min=1, help="Paired runs of each engine's batch (median taken).")] = 3,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """N jobs in one `diffedit batch` vs N separate processes, batch vs pure compute, and per engine N
    inversions and N edits micro-batched 4 at a time vs one by one (toy model).

    Example: diffedit bench batch --save benchmarks/results/batch
    """
    from lab.benchmarks import batch as bench

    with stderr.status("measuring"):
        row = bench.run(n=n, steps=steps)
        edits = bench.edit_micro_batching([e for e in engines.split(",") if e], n=n, repeats=repeats) if engines else []
    table = bench.markdown(row) + ("\n\n" + bench.edits_markdown(edits) if edits else "")
    _report([row, *edits], table, save, json)


@bench_app.command("accelerators")
def accelerators(
    n: Annotated[int, typer.Option(min=1, help="Number of seeded prompts.")] = 50,
    steps: Annotated[int, typer.Option(min=1)] = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Adaptive guidance, DeepCache and torch.compile vs CFG on the toy model: speed-up and success side by side.

    Example: diffedit bench accelerators --n 50 --save benchmarks/results/accelerators
    """
    from diffedit.models import load_model
    from lab.benchmarks import accelerators as bench

    with stderr.status("measuring"):
        rows = bench.run(load_model(None, device="cpu"), n=n, steps=steps, guidance_scale=guidance_scale)
    _report(rows, bench.markdown(rows), save, json)


@bench_app.command("memory")
def memory(
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Peak memory of the toy model's VAE round trip by image size, with and without --vae-tiling.

    Example: diffedit bench memory --save benchmarks/results/memory
    """
    from lab.benchmarks import memory as bench

    with stderr.status("measuring"):
        rows = bench.run()
    _report(rows, bench.markdown(rows), save, json)


@bench_app.command("scale")
def scale(
    family: Annotated[str, typer.Option(help="sd1 (512²), sdxl (1024²), sd3 or flux (1024², transformers cut in depth).")] = "sd1",
    jobs: Annotated[str | None, typer.Option(help="Comma-separated jobs (default: every engine and diffusers' references).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Rounds over all jobs, interleaved (medians).")] = 1,
    size: Annotated[int | None, typer.Option(min=64, help="Image side in pixels (default the family's; sd1 at 1024: 16384 attention tokens).")] = None,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Every engine on a full-size architecture with random weights (nothing downloaded), 1-3 steps, one
    fresh process per job: seconds ÷ (forwards + VAE), peak memory ÷ generate's, ours ÷ diffusers.

    Example: diffedit bench scale --family sd1 --save benchmarks/results/scale-sd1
    """
    from lab.benchmarks import scale as bench

    with stderr.status("measuring"):
        rows = bench.run(family, tuple(jobs.split(",")) if jobs else None, device, repeats, size)
    _report(rows, bench.markdown(rows), save, json)


@bench_app.command("lcm")
def lcm(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Latent-consistency model (default: the shipped toy LCM).")] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="The model it was distilled from (default: the shipped toy model).")] = None,
    lcm_lora: Annotated[list[str] | None, typer.Option("--lcm-lora", help="LCM-LoRA file(s) of the teacher to measure too (fused into it; no CFG: their guidance is distilled in).")] = None,
    n: Annotated[int, typer.Option(min=1, help="Seeded prompts per row.")] = 100,
    steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "1,2,4,8",
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """Few-step prompt following (checker) and time: an LCM (and LCM-LoRAs) against the teacher at the same steps.

    Example: diffedit bench lcm --lcm-lora samples/toy-lcm-lora/pytorch_lora_weights.safetensors --save benchmarks/results/lcm
    """
    from diffedit.errors import UsageError
    from diffedit.models import TOY_LCM, load_model
    from lab.benchmarks import lcm as bench

    m, t = load_model(model or TOY_LCM, device="cpu"), load_model(teacher, device="cpu")
    if not m.consistency:
        raise UsageError(f"{m.source}: not a latent-consistency model (its scheduler is {type(m.pipe.scheduler).__name__})")
    students = [("lcm", m)] + [("lcm-lora" if len(lcm_lora) == 1 else f"lcm-lora {Path(f).name}",
                                load_model(teacher, device="cpu", lcm_lora=f)) for f in lcm_lora or []]
    counts = tuple(int(k) for k in steps.split(",") if k.strip())
    rows = bench.run(students, t, n=n, steps=counts, guidance_scale=guidance_scale,
                     log=lambda line: stderr.print(line))
    _report(rows, bench.markdown(rows), save, json)


@bench_app.command("erase")
def erase(
    adapter: Annotated[list[Path] | None, typer.Option("--adapter", help="Adapter(s) to measure (default: the shipped toy adapters).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Default: the shipped toy model.")] = None,
    n: Annotated[int, typer.Option(min=1, help="Seeded prompts per set (naming each concept; naming none).")] = 50,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps per image.")] = 30,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    finetune_steps: Annotated[int, typer.Option(help="Training steps of the fine-tuned copy (transfer).")] = 300,
    finetuned: Annotated[str | None, typer.Option(help="An existing fine-tuned copy to use instead of making one.")] = None,
    save: SaveOpt = None,
    json: JsonOpt = False,
):
    """SPM concept erasure: concept rate and preservation with/without adapters, transport on/off, two adapters, transfer.

    Example: diffedit bench erase --save benchmarks/results/erase
    """
    from diffedit.models import load_model
    from lab.benchmarks import erase as bench

    shipped = Path(__file__).resolve().parents[1] / "samples" / "toy-sd-spm"
    files = [str(a) for a in adapter] if adapter else [str(shipped / "red.spm.safetensors"),
                                                        str(shipped / "circle.spm.safetensors")]
    m = load_model(model, device="cpu")
    rows = bench.run(m, files, n=n, steps=steps, guidance_scale=guidance_scale, finetune_steps=finetune_steps,
                     finetuned=finetuned, log=lambda line: stderr.print(line))
    _report(rows, bench.markdown(rows), save, json)
