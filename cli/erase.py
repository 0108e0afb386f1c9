"""`diffedit erase ...`: concept erasure with SPM one-dimensional adapters (train, info)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    SEED_MAX,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    OverwriteOpt,
    PickleOpt,
    QuietOpt,
    emit,
    finite_scale,
    load,
    stderr,
)
from diffedit.cli.main import app

erase_app = typer.Typer(help="Concept erasure with SPM adapters: train one per concept, inspect it.",
                        no_args_is_help=True)
app.add_typer(erase_app, name="erase")


@erase_app.command("train")
def train(
    concept: Annotated[str, typer.Option("--concept", "-c", help="The concept to erase (a word or phrase).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter file to write (.spm.safetensors).")],
    surrogate: Annotated[str, typer.Option("--surrogate", help="What the concept becomes (default \"\": nothing in particular).")] = "",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Training prompt naming the concept (repeatable; default: the concept alone, as in the paper). Its neutral is the prompt with the concept replaced by the surrogate.")] = None,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="Training iterations (paper: 3000).")] = 3000,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (paper: 1e-4).")] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up iterations, then cosine with 3 restarts (paper: 500).")] = 500,
    steps: Annotated[int, typer.Option("--steps", "-n", min=2, help="DDIM schedule x_t is sampled on (paper: 30).")] = 30,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", "-g", callback=finite_scale, help="CFG while sampling x_t with the adapter on (paper: 3).")] = 3.0,
    erase_guidance: Annotated[float, typer.Option("--erase-guidance", help="g in neutral - g (concept - neutral) (paper: 1).")] = 1.0,
    anchors: Annotated[int, typer.Option("--anchors", min=0, help="Latent anchors per iteration (paper: 4; 0 = no anchoring).")] = 4,
    anchor_weight: Annotated[float, typer.Option("--anchor-weight", help="Weight of the anchoring loss (paper: 1000).")] = 1000.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Everything is drawn from this seed.")] = 0,
    work: Annotated[Path | None, typer.Option("--work", help="Checkpoint folder (default: runs/spm/<output name>).")] = None,
    every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Save a checkpoint every N iterations.")] = 50,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Continue from the checkpoint in --work.")] = True,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32",
    allow_pickle: PickleOpt = False, model_config: ConfigOpt = None,
    overwrite: OverwriteOpt = False, json: JsonOpt = False, quiet: QuietOpt = False,
):
    """Train an SPM adapter that erases CONCEPT (ESD objective + latent anchoring; resumable).

    Example: diffedit erase train --concept red -o red.spm.safetensors
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from diffedit.editing.spm import TrainConfig, check_concept
    from diffedit.editing.spm import train as run_training
    from diffedit.files import check_writable

    check_concept(concept)
    check_writable(output, overwrite)
    work = work or Path("runs/spm") / output.name.split(".")[0]
    checkpoint = work / "checkpoint.pt"
    if not resume and checkpoint.exists():
        checkpoint.unlink()
    config = TrainConfig(iterations=iterations, lr=lr, warmup=warmup, steps=steps, sample_guidance=guidance_scale,
                         g=erase_guidance, anchors=anchors, anchor_weight=anchor_weight, seed=seed)
    m = load(model, device, dtype, allow_pickle, model_config)
    columns = [TextColumn("erase " + concept), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.5f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, disable=quiet or not stderr.is_terminal) as bar:
        task = bar.add_task("train", total=iterations, loss=0.0)

        def tick(done, total, loss):
            bar.update(task, completed=done, loss=loss)
            if not quiet and not stderr.is_terminal and done % 100 == 0:
                stderr.print(f"erase {concept} {done}/{total} loss {loss:.5f}")

        membrane, info = run_training(m, concept, surrogate, prompts=prompt, config=config, checkpoint=checkpoint,
                                      every=every, tick=tick)
    membrane.save(output, overwrite=overwrite)
    emit({"output": str(output), "concept": concept, "iterations": info["iterations"], "seconds": info["seconds"],
          "erase_loss_first": info["erase_loss_first"], "erase_loss_last": info["erase_loss_last"],
          "anchor_loss_last": info["anchor_loss_last"], "params": membrane.params}, json)


@erase_app.command("info")
def info(
    adapter: Annotated[Path, typer.Argument(help="Adapter file (.spm.safetensors).")],
    json: JsonOpt = False,
):
    """What an adapter erases, for which family, how it was trained.

    Example: diffedit erase info samples/toy-sd-spm/red.spm.safetensors
    """
    import json as jsonlib

    from diffedit.editing.spm import Membrane

    m = Membrane.load(adapter)
    described = {"file": str(adapter), **m.describe()}
    if json:
        typer.echo(jsonlib.dumps(described))
        return
    training = described.pop("training")
    emit({k: v for k, v in described.items()}, False)
    if training:
        emit({"training": jsonlib.dumps({k: v for k, v in training.items() if k != "losses"}),
              "losses": jsonlib.dumps(training.get("losses"))}, False)
