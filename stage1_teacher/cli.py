"""`kd-cache`: build, inspect and verify teacher caches."""
from __future__ import annotations

import contextlib
import json
import logging
import os

import click

from common.defaults import CHUNK_ROWS, DTYPES, MAIN_TEACHER, ON_ERROR_CHOICES
from common.errors import NON_NEGATIVE, POSITIVE, SEED, DataPatternGroup, check_device, reported_errors
from common.lock import output_lock

# The commands import their stage's modules (torch, open_clip, zarr) when they run, so that --help and option
# errors answer at once.

@click.group(cls=DataPatternGroup)
@click.option("-v", "--verbose", "--debug", "verbose", is_flag=True, help="debug log, with error tracebacks")
def main(verbose: bool):
    """Stage one: cache a CLIP teacher's targets in a Zarr store."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")


@main.command()
@click.option("--teacher", required=True, help="open_clip model name, path to a model config JSON, or hub model (hf-hub:ORG/REPO, local-dir:PATH)")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (QuickGELU tags build the QuickGELU model), local checkpoint path, or a hub model of the same architecture")
@click.option("--data", required=True, help="shards: brace pattern, directory, or '::'-separated list")
@click.option("--out", required=True, help="the Zarr store to write (or resume): a path or URL (s3://...)")
@click.option("--batch-size", default=256, show_default=True, type=POSITIVE)
@click.option("--grad-batch", default=1024, show_default=True, type=click.IntRange(min=2),
              help="rows per gradient batch")
@click.option("--views", default=0, show_default=True, type=NON_NEGATIVE,
              help="augmented views K stored beside the clean view")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="cpu or cuda (cuda = this rank's GPU under torchrun)")
@click.option("--workers", default=2, show_default=True, type=NON_NEGATIVE,
              help="DataLoader decoding workers")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp16", show_default=True)
@click.option("--on-error", type=click.Choice(ON_ERROR_CHOICES), default="raise", show_default=True)
@click.option("--seed", default=0, show_default=True, type=SEED, help="seeds view crops and gradient batches")
@click.option("--chunk-rows", default=CHUNK_ROWS, show_default=True, type=POSITIVE,
              help="rows per Zarr chunk (= work block)")
@click.option("--grads/--no-grads", default=True, show_default=True,
              help="store the teacher's contrastive-loss gradients (GD recomputes them exactly without)")
@click.option("--window-blocks", default=0, show_default=True, type=NON_NEGATIVE,
              help="blocks per gradient window (0: enough for 8192 rows); bounds the build's memory per rank")
@click.option("--overwrite", is_flag=True, help="replace a store built with other options")
def build(**kwargs):
    """Run the teacher once over the corpus; resumable, and splits across torchrun ranks."""
    out = kwargs["out"]
    # one build per store: torchrun's rank 0 holds the lock (ranks start together; a second command is refused)
    from stage1_teacher.build import BuildOptions, build_cache

    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with reported_errors(store=out, out=out), output_lock(out) if holds_lock else contextlib.nullcontext():
        build_cache(BuildOptions(**kwargs))


@main.command("add-teacher")
@click.argument("store")
@click.option("--name", required=True, help="the teacher's name in the store (kd-train --teachers NAME)")
@click.option("--teacher", required=True, help="open_clip model name, path to a model config JSON, or hub model (hf-hub:ORG/REPO, local-dir:PATH)")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (QuickGELU tags build the QuickGELU model), local checkpoint path, or a hub model of the same architecture")
@click.option("--data", required=True, help="the shards the store was built from")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="cpu or cuda (cuda = this rank's GPU under torchrun)")
@click.option("--workers", default=2, show_default=True, type=NON_NEGATIVE, help="DataLoader decoding workers")
def add_teacher(store: str, name: str, **kwargs):
    """Add another teacher's targets over the store's rows, views and gradient batches (and captions, if any);
    resumable, splits across torchrun ranks, leaves the other teachers untouched."""
    from stage1_teacher.build import BuildOptions, build_cache

    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with reported_errors(store=store, out=store), output_lock(store) if holds_lock else contextlib.nullcontext():
        build_cache(BuildOptions(out=store, name=name, **kwargs))


@main.command()
@click.argument("store")
@click.option("--data", required=True, help="the shards the store was built from")
@click.option("--captioner", required=True, help="open_clip CoCa model name or config JSON")
@click.option("--pretrained", default=None, help="the captioner's local checkpoint (or open_clip tag)")
# not --num: torchrun reads it as its own --numa-binding (argparse abbreviations), so it would never arrive here
@click.option("--per-image", "num", default=5, show_default=True, type=POSITIVE, help="captions per image")
@click.option("--seed", default=0, show_default=True, type=SEED, help="seeds the nucleus sampling (per row)")
@click.option("--seq-len", default=None, type=POSITIVE,
              help="tokens per caption at most, start/end markers included [default: the captioner's context]")
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE, help="images per captioner batch")
@click.option("--teacher-pretrained", "teacher_pretrained", multiple=True,
              help="NAME=PATH: a teacher's checkpoint, if it moved since it was added (repeatable)")
@click.option("--device", default="cpu", show_default=True, callback=check_device)
@click.option("--overwrite", is_flag=True, help="replace captions made with another captioner or options")
def captions(store: str, teacher_pretrained: tuple[str, ...], **kwargs):
    """Generate N synthetic captions per image with a CoCa captioner, and embed them with every teacher."""
    from common.models import named_weights
    from stage1_teacher.captions import CaptionOptions, build_captions

    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with reported_errors(store=store, out=store), output_lock(store) if holds_lock else contextlib.nullcontext():
        build_captions(CaptionOptions(store=store, teacher_pretrained=named_weights(",".join(teacher_pretrained),
                                                                                    MAIN_TEACHER), **kwargs))


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def info(store: str, as_json: bool):
    """Summary of a store: rows, teacher, provenance, size on disk."""
    from stage1_teacher.inspect import store_summary

    with reported_errors(store=store):
        summary = store_summary(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            click.echo(f"{key:>22}: {value}")


@main.command()
@click.argument("store")
@click.option("--data", default=None, help="the shards the store was built from [default: the shards it records]")
@click.option("--sample", default=32, show_default=True, type=POSITIVE, help="rows to recompute with the teacher")
@click.option("--teacher-pretrained", default=None,
              help="teacher weights, if they moved since the build: PATH (main), or NAME=PATH,NAME=PATH")
@click.option("--device", default="cpu", show_default=True, callback=check_device)
@click.option("--seed", default=0, show_default=True, type=SEED)
def verify(store: str, data: str | None, sample: int, teacher_pretrained: str | None, device: str, seed: int):
    """Check keys against the shards and recompute random rows (and one gradient batch) with the teacher."""
    from stage1_teacher.inspect import verify_store

    with reported_errors(store=store):
        report = verify_store(store, data, sample, teacher_pretrained, device, seed)
    for line in report["lines"]:
        click.echo(line)
    if not report["ok"]:
        raise click.ClickException(f"store {store} failed verification")
    click.echo("OK")


if __name__ == "__main__":
    main()
