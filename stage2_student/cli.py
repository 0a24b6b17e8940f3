"""`kd-train`: stage two. Its options are the fields of `stage2_student.options.TrainOptions`."""
from __future__ import annotations

import logging
import os

import click

from common.errors import DataPatternCommand, reported_errors
from stage2_student.options import TrainOptions, click_options


@click.command(cls=DataPatternCommand)
@click_options
@click.option("-v", "--verbose", "--debug", "verbose", is_flag=True, help="debug log, with error tracebacks")
def main(verbose: bool, **kwargs):
    """Train a CLIP student against a teacher cache (live teacher as fallback)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")
    from stage2_student.train import train  # heavy (torch, open_clip, zarr): not for --help

    with reported_errors(store=kwargs["cache"], out=kwargs["out"]):
        summary = train(TrainOptions(**kwargs))
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not per torchrun process
        click.echo(summary)


if __name__ == "__main__":
    main()
