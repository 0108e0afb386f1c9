"""`diffedit toy ...`: the toy world (shapes data, checker, toy model training and quality)."""

from __future__ import annotations

import json as jsonlib
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from diffedit.cli.bench import TasksOpt
from diffedit.cli.common import JsonOpt, ReportChoice, emit, stderr, with_report_options
from diffedit.cli.main import app

toy_app = typer.Typer(help="The toy shapes world: data, checker, toy model training.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _multiple_of_16(width: int) -> int:
    if width % 16:  # the VAE's group norms split each level's channels into 16 groups
        raise typer.BadParameter(f"{width} is not a multiple of 16")
    return width


def _chances(counts: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(counts) < 0 or abs(sum(counts) - 1) > 1e-6:
        raise typer.BadParameter(f"{' '.join(map(str, counts))}: three chances of 1, 2 and 3 objects, none negative, summing to 1")
    return counts


@toy_app.command("train")
def train(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the trained pipeline "
                                                "[default: samples/toy-sd, with --flow samples/toy-flow].")] = None,
    work: Annotated[Optional[Path], typer.Option("--work", help="Checkpoints, resumable, kept out of git "
                                                 "[default: runs/toy-sd or runs/toy-flow].")] = None,
    seed: Annotated[int, typer.Option(help="Everything is drawn from this seed.")] = 0,
    vae_width: Annotated[int, typer.Option(min=16, callback=_multiple_of_16, help="VAE channels per level: width, 2 width, 2 width (a multiple of 16).")] = 48,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps (batch 16).")] = 2000,
    unet_steps: Annotated[int, typer.Option(help="UNet and text encoder training steps (batch 48).")] = 4000,
    decoder_steps: Annotated[int, typer.Option(help="Decoder fine-tuning steps (encoder frozen).")] = 1000,
    decoder_mse_steps: Annotated[int, typer.Option(help="Phase 5: decoder steps on MSE, encoder frozen (as `toy tune-decoder`).")] = 1300,
    plain_decoder_steps: Annotated[int, typer.Option(min=0, help="Phase 6: the same again with 85 % of the scenes on plain colours and the next seed (as `toy tune-decoder --plain 0.85 --seed SEED+1`); 0 skips it.")] = 3000,
    layout_steps: Annotated[int, typer.Option(min=0, help="Phase 3b: steps that train the UNet's layout to follow its attention maps (colour swaps with the source's maps); 0 skips it.")] = 600,
    relayout_steps: Annotated[int, typer.Option(min=0, help="Phase 7: phase 3b's loss again on the saved model with fresh scenes and swaps, of --relayout-seed (as `toy tune-layout --steps N --seed SEED+1` by default); 0 skips it.")] = 300,
    relayout_seed: Annotated[Optional[int], typer.Option(help="Phase 7's seed (its scenes, swaps and batches; phase 8 takes the next) [default: SEED+1].")] = None,
    reshape_layout_steps: Annotated[int, typer.Option(min=0, help="Phase 8: the layout loss with 16 shape swaps a step beside the colour swaps, on the seed after phase 7's (as `toy tune-layout --steps N --seed SEED+2 --reshapes 16`); 0 skips it.")] = 0,
    grounding: Annotated[float, typer.Option(min=0.0, help="Phases 7 and 8: weight of a token-grounding loss on the colour swaps' source rows (each object word's cross-attention kept on its object; as `toy tune-layout --grounding W`); 0: none.")] = 0.05,
    grounding_below: Annotated[int, typer.Option(min=0, max=1000, help="The grounding only on noise levels (DDPM timesteps) under this one; 1000: every level.")] = 500,
    dataset: Annotated[int, typer.Option(help="Scenes encoded once for UNet training.")] = 20_000,
    object_counts: Annotated[tuple[float, float, float], typer.Option(callback=_chances, help="Chances of 1, 2 and 3 objects in the UNet's scenes (phases 3 and 7; the world's random scenes: 0.5 0.3 0.2).")] = (0.35, 0.4, 0.25),
    text_context: Annotated[Literal["word", "previous", "causal"], typer.Option(help="What each text token sees: its own word (v2 and v3), the word before it too (v4, shipped: a shape's token carries its colour), or every earlier word (CLIP's causal mixing, v1's kind); see samples/toy-sd/README.md.")] = "previous",
    flow: Annotated[bool, typer.Option("--flow", help="Train the toy flow model (SD3-style MMDiT, flow matching) "
                                       "on the VAE of --vae-from instead.")] = False,
    flow_steps: Annotated[int, typer.Option(help="Transformer training steps with --flow (batch 48).")] = 12_000,
    flow_lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate with --flow (AdamW, cosine to a tenth).")] = 8e-4,
    user_captions: Annotated[bool, typer.Option("--user-captions/--template-captions", help="With --flow: train on the "
                                                "captions as people type them (any order, article or none, background "
                                                "phrase or none; the shipped model) or on the world's template only.")] = True,
    init_from: Annotated[Optional[Path], typer.Option(help="With --flow: a saved toy flow model to fine-tune onto the "
                                                      "latents of --vae-from (its text encoders kept, its transformer "
                                                      "the start) instead of training from scratch.")] = None,
    vae_from: Annotated[Optional[Path], typer.Option(help="Saved toy SD model whose VAE is used as it is (only the "
                                                     "denoiser and text encoder are trained) [default with --flow: "
                                                     "samples/toy-sd].")] = None,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Continue from the checkpoints in --work.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
):
    """Train the toy model from a seed and save it (the defaults are the shipped model's recipe, v4, but
    for phase 7's seed: it was drawn with --relayout-seed 3; over 3 hours on 2 CPU cores from scratch, 84
    minutes with --vae-from, in phases of under an hour, each resumable; --flow about 57 minutes from
    scratch, 25 for 6000 steps of fine-tuning with --init-from).

    Example: diffedit toy train --out runs/my-toy-sd --vae-from samples/toy-sd --relayout-seed 3; diffedit toy train --flow
    """
    import shutil

    from diffedit.errors import DiffeditError
    from diffedit.models import _quiet_libraries
    from lab.toy import flow as toy_flow
    from lab.toy.train import TrainConfig
    from lab.toy.train import train as run_training

    _quiet_libraries()
    name = "toy-flow" if flow else "toy-sd"
    out, work = out or Path("samples", name), work or Path("runs", name)
    if out.exists() and not overwrite:
        raise DiffeditError(f"{out}: already exists; pass --overwrite to replace it")
    if init_from is not None and not flow:
        raise DiffeditError("--init-from fine-tunes a toy flow model: it needs --flow")
    if init_from is not None and not (init_from / "transformer" / "config.json").exists():
        raise DiffeditError(f"{init_from}: no toy flow model (transformer/config.json) to start from")
    if not resume and work.exists():
        shutil.rmtree(work)
    if flow:
        config = toy_flow.FlowTrainConfig(seed=seed, steps=flow_steps, lr=flow_lr, dataset=dataset,
                                           user_captions=user_captions)
        train_model = lambda *args: toy_flow.train(*args, vae_from=vae_from or Path("samples/toy-sd"),  # noqa: E731
                                                   init_from=init_from)
    else:
        config = TrainConfig(seed=seed, vae_width=vae_width, vae_steps=vae_steps, unet_steps=unet_steps, decoder_steps=decoder_steps,
                             decoder_mse_steps=decoder_mse_steps, plain_decoder_steps=plain_decoder_steps, dataset=dataset,
                             object_counts=tuple(object_counts),
                             text_context=text_context,
                             layout_steps=layout_steps, relayout_steps=relayout_steps, relayout_seed=relayout_seed,
                             reshape_layout_steps=reshape_layout_steps, grounding=grounding,
                             grounding_below=grounding_below)
        train_model = lambda *args: run_training(*args, vae_from=vae_from)  # noqa: E731
    with training_progress() as tick:
        summary = train_model(out, work, config, tick)
    emit({"output": str(out), **summary}, False)


@toy_app.command("tune-decoder")
def tune_decoder(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved toy SD model whose VAE decoder is tuned in place.")] = Path("samples/toy-sd"),
    work: Annotated[Path, typer.Option("--work", help="Checkpoints, resumable, kept out of git.")] = Path("runs/toy-sd"),
    steps: Annotated[int, typer.Option(min=1, help="Decoder steps on MSE (batch 16).")] = 1300,
    seed: Annotated[int, typer.Option(help="Seed of the batches.")] = 0,
    plain: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the scenes put on a plain colour (the shipped recipe: 0.5).")] = 0.5,
    whole_plain: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the plain scenes drawn as one colour throughout, no objects (the shipped recipe: 0).")] = 0.0,
):
    """Tune a saved toy model's VAE decoder for PSNR and exact plain colours (MSE on the clamped
    image, half the scenes on plain colours, half of those saturated; encoder frozen, so the latents
    and every model trained on them stay valid): phase 5 of `toy train` on its own (phase 6 with
    --steps 3000 --plain 0.85 --seed 1).

    Example: diffedit toy tune-decoder -m samples/toy-sd --steps 1300
    """
    from diffedit.errors import DiffeditError
    from diffedit.models import _quiet_libraries
    from lab.toy.train import TrainConfig
    from lab.toy.train import tune_decoder as run_tuning

    _quiet_libraries()
    if not (model / "vae" / "config.json").exists():
        raise DiffeditError(f"{model}: no VAE folder (vae/config.json) to tune")
    with training_progress() as tick:
        summary = run_tuning(model, work, TrainConfig(seed=seed, decoder_mse_steps=steps, decoder_plain_fraction=plain,
                                                     decoder_whole_plain_fraction=whole_plain), tick)
    emit({"output": str(model), **summary}, False)


@toy_app.command("tune-layout")
def tune_layout(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved toy SD model whose UNet and text encoder are tuned in place.")] = Path("samples/toy-sd"),
    work: Annotated[Path, typer.Option("--work", help="Checkpoints and encoded scenes, resumable, kept out of git.")] = Path("runs/toy-sd"),
    steps: Annotated[int, typer.Option(min=1, help="Layout steps (phase 3b's loss; the shipped recipe ran 600 from the UNet phase, then 300 more as phase 7).")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the scenes, colour swaps and batches (the shipped model's phase 3b: 0, its phase 7: 3).")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, warm-up, cosine to a tenth).")] = 2e-4,
    reshapes: Annotated[int, typer.Option(min=0, help="Shape swaps per step beside the 16 colour swaps, under a reshape's schedule (phase 8); 0: colour swaps only.")] = 0,
    grounding: Annotated[float, typer.Option(min=0.0, help="Weight of a token-grounding loss on the colour swaps' source rows: each object word's cross-attention kept on its object (TokenCompose's token loss); 0: none.")] = 0.05,
    grounding_below: Annotated[int, typer.Option(min=0, max=1000, help="The grounding only on noise levels (DDPM timesteps) under this one; 1000: every level.")] = 500,
):
    """Train a saved toy model's layout further (phase 3b of `toy train` again: every attention map of a
    colour swap's row taken from its source's, the recoloured scene asked for), UNet and text encoder
    saved in place; the VAE and its latents stay. Phase 7 of `toy train` is this command with its defaults
    on the saved model (with `toy train`'s default seed; about 12 minutes on 2 CPU cores, the encoding of
    20 000 scenes included).

    Example: diffedit toy tune-layout -m samples/toy-sd --steps 300 --seed 1
    """
    from diffedit.errors import DiffeditError
    from diffedit.models import _quiet_libraries
    from lab.toy.train import TrainConfig, tune_saved_layout

    _quiet_libraries()
    if not (model / "unet" / "config.json").exists():
        raise DiffeditError(f"{model}: no toy SD model (unet/config.json) to tune")
    with training_progress() as tick:
        config = TrainConfig(seed=seed, layout_steps=steps, layout_lr=lr, reshape_batch=reshapes, grounding=grounding,
                             grounding_below=grounding_below)
        summary = tune_saved_layout(model, work, config, tick)
    emit({"output": str(model), **summary}, False)


@contextmanager
def training_progress():
    """A `tick(phase, done, total, loss)` drawing one bar per phase (a log line per 100 when piped)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, disable=not stderr.is_terminal) as bar:
        tasks = {}

        def tick(phase, done, total, loss):
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, loss=0.0)
            bar.update(tasks[phase], completed=done, loss=loss)
            if not stderr.is_terminal and done % 100 == 0:
                stderr.print(f"{phase} {done}/{total} loss {loss:.4f}")

        yield tick


@toy_app.command("distill-lcm")
def distill_lcm(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the latent-consistency pipeline (default samples/toy-lcm; with --lora-rank: for the LoRA file, default samples/toy-lcm-lora).")] = None,
    teacher: Annotated[Path, typer.Option("--teacher", help="Toy SD model to distil.")] = Path("samples/toy-sd"),
    work: Annotated[Path | None, typer.Option("--work", help="Checkpoints (resumable; kept out of git; default runs/<out's name>).")] = None,
    seed: Annotated[int, typer.Option(help="Everything is drawn from this seed.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Distillation steps (batch 32).")] = 1000,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=0, help="Distil an LCM-LoRA of this rank (fused into the teacher with --lcm-lora) instead of a whole LCM; its guidance scale is fixed at 5, the toy model's tuned CFG.")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Continue from the checkpoints in --work.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
):
    """Distil a latent-consistency model (LCM) or an LCM-LoRA from the toy model: 1-8 step sampling,
    and InfEdit at the paper's step count (about 20-25 minutes on 2 CPU cores).

    Example: diffedit toy distill-lcm -o samples/toy-lcm; diffedit toy distill-lcm --lora-rank 16
    """
    import shutil

    from diffedit.errors import DiffeditError
    from diffedit.models import _quiet_libraries
    from lab.toy.lcm import DistillConfig, distill, lora_config

    _quiet_libraries()
    out = out or Path("samples/toy-lcm-lora" if lora_rank else "samples/toy-lcm")
    work = work or Path("runs") / out.name
    if out.exists() and not overwrite:
        raise DiffeditError(f"{out}: already exists; pass --overwrite to replace it")
    if not resume and work.exists():
        shutil.rmtree(work)
    with training_progress() as tick:
        config = lora_config(seed, steps, lora_rank) if lora_rank else DistillConfig(seed=seed, steps=steps)
        summary = distill(teacher, out, work, config, tick)
    emit({"output": str(out), **summary}, False)


@toy_app.command("quality")
def quality(
    model: Annotated[Path, typer.Option("--model", "-m")] = Path("samples/toy-sd"),
    n: Annotated[int, typer.Option(min=2, help="Number of seeded single-object prompts per form (half as many two-object ones).")] = 200,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 5.0,
    json: JsonOpt = False,
):
    """Checker scores of generated images (single objects; two objects, colour bound to shape), VAE and
    DDIM round-trip PSNR.

    Example: diffedit toy quality --n 200
    """
    from lab.toy.quality import report

    with stderr.status("measuring"):
        result = report(str(model), n=n, steps=steps, guidance_scale=guidance_scale)
    typer.echo(jsonlib.dumps(result)) if json else emit(result, False)


@toy_app.command("layout")
def layout(
    model: Annotated[Path, typer.Option("--model", "-m")] = Path("samples/toy-sd"),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N recolour tasks (default: all 40).")] = None,
    tasks: TasksOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g")] = 7.5,
    word_only: Annotated[bool, typer.Option("--word-only", help="The target's text encoding is the source's but at the swapped word's token (on an encoder whose tokens see the word before them, a recolour changes the next token too).")] = False,
    json: JsonOpt = False,
):
    """The layout-in-attention diagnostic: ShapesBench recolour edits with every attention map of the
    target taken from the (exactly inverted) source; % of tasks whose objects all stay within 2 px,
    of the source and of a no-edit control regenerated the same way with the source's own prompt.

    Example: diffedit toy layout -m samples/toy-sd --limit 10
    """
    from diffedit.models import load_model
    from lab.toy.bench import TASKS, load_tasks
    from lab.toy.quality import layout_in_attention

    tasks_file = tasks or TASKS
    recolours = [t for t in load_tasks(tasks_file) if t["kind"] == "recolour"][:limit]
    with stderr.status("measuring"):
        result = layout_in_attention(load_model(str(model), device="cpu"), recolours, steps, guidance_scale,
                                     word_only=word_only)
    emit({"model": str(model), "tasks_file": tasks_file.name, **result}, json)


@toy_app.command("scene")
@with_report_options
def scene(
    seed: Annotated[int, typer.Argument(help="Scene seed.")],
    output: Annotated[str, typer.Option("--output", "-o", help="PNG file, or - for stdout.")] = "-",
    size: Annotated[int, typer.Option(help="Side in pixels.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    *, report: ReportChoice,
):
    """Render a scene of the shapes world and print its caption.

    Example: diffedit toy scene 7 -o scene.png
    """
    from PIL import Image

    from diffedit.images import save_image
    from diffedit.toy.shapes import make_scene

    report.check(output, overwrite)
    s = make_scene(seed, size=size)
    save_image(Image.fromarray(s.image), output, params={"command": "toy scene", "seed": seed, "caption": s.caption},
               overwrite=overwrite)
    report.emit({"output": output, "caption": s.caption}, output, False, overwrite)


@toy_app.command("make-bench")
def make_bench(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: samples/shapesbench.jsonl, or samples/shapesbench-heldout.jsonl with --held-out.")] = None,
    held_out: Annotated[bool, typer.Option("--held-out", help="The held-out tasks: the same kinds on other scenes, to check settings chosen on ShapesBench.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
):
    """Write the ShapesBench task file (fixed: the same tasks every time).

    Example: diffedit toy make-bench --overwrite
    """
    from diffedit.files import atomic_output
    from lab.toy.bench import HELD_OUT, TASKS, make_held_out_tasks, make_tasks

    tasks = make_held_out_tasks() if held_out else make_tasks()
    output = output or (HELD_OUT if held_out else TASKS)
    with atomic_output(output, overwrite) as tmp:
        tmp.write_text("".join(jsonlib.dumps(t) + "\n" for t in tasks))
    emit({"output": str(output), "tasks": len(tasks)}, False)


@toy_app.command("finetune")
def finetune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fine-tuned pipeline (keep it out of git).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Toy model to start from.")] = Path("samples/toy-sd"),
    steps: Annotated[int, typer.Option(min=1, help="Further UNet training steps (batch 32).")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the new scenes and batches.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    json: JsonOpt = False,
):
    """A fine-tuned copy of the toy model (its UNet trained further on fresh scenes), e.g. to test that
    SPM adapters transfer.

    Example: diffedit toy finetune -o /tmp/toy-sd-ft --steps 300
    """
    from diffedit.errors import DiffeditError
    from diffedit.models import _quiet_libraries
    from lab.toy.train import finetune as run_finetune

    _quiet_libraries()
    if out.exists() and not overwrite:
        raise DiffeditError(f"{out}: already exists; pass --overwrite to replace it")
    with stderr.status("fine-tuning"):
        summary = run_finetune(model, out, steps=steps, seed=seed, lr=lr)
    typer.echo(jsonlib.dumps({"output": str(out), **summary})) if json else emit({"output": str(out), **summary}, False)
