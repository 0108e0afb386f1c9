"""`diffedit mask`: the region words of a prompt attend to, as a mask file a person can check and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffedit.cli.common import (
    SEED_MAX,
    AlphaOpt,
    FitOpt,
    InvertMaskOpt,
    MaskDilateOpt,
    ModelChoice,
    OverwriteOpt,
    QuietOpt,
    ReportChoice,
    ShowMaskOpt,
    inputs_exist,
    with_model_options,
    with_report_options,
)
from diffedit.cli.main import app


@app.command()
@with_model_options
@with_report_options
def mask(
    image: Annotated[str, typer.Argument(help="Image file, or - for stdin.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt describing the image.")],
    words: Annotated[str, typer.Option("--words", "-w", help="Word(s) of --prompt naming the region, e.g. \"red circle\".")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask PNG (white = the region), at the image's own size.")],
    mask_dilate: MaskDilateOpt = 0,
    invert_mask: InvertMaskOpt = False,
    show_mask: ShowMaskOpt = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the noise the image is seen through.")] = 0,
    fit: FitOpt = "pad", alpha: AlphaOpt = "composite",
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    *, models: ModelChoice, report: ReportChoice,
):
    """Write the mask of where WORDS of the prompt attend in IMAGE, to check before `edit --mask`.

    Example: diffedit mask photo.png -p "a red circle and a blue square" -w "red circle" -o circle.png
    """
    inputs_exist(image)
    report.check(output, overwrite)
    from diffedit.files import check_writable
    from diffedit.images import save_image
    from diffedit.jobs import ImageInput, MaskInput, word_mask
    from diffedit.masks import MaskOptions

    options = MaskOptions(dilate=mask_dilate, feather=0, invert=invert_mask)
    options.check()
    for path in (output, show_mask):
        if path is not None:
            check_writable(path, overwrite)
    m = models.load(quiet=quiet)
    found, overlay, result = word_mask(m, image, prompt, MaskInput(words=words, options=options),
                                       ImageInput(fit=fit, alpha=alpha), seed)
    save_image(found, output, overwrite=overwrite)
    if show_mask is not None:
        save_image(overlay, show_mask, overwrite=overwrite)
    report.emit({"output": str(output), **result}, output, quiet, overwrite)
