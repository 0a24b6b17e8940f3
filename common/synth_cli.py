"""`kd-data`: data utilities; `kd-data synth OUT` writes the embedded synthetic demo/test corpus."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

CORPUS_FILE = "corpus.json"


def _default_workers() -> int:
    """One worker per CPU, at most 8."""
    return min(8, os.cpu_count() or 1)


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT unless `overwrite`; with it, remove only what `synth` writes there (the split
    directories and corpus.json), keeping any other file."""
    from common.synth import SPLITS  # numpy, PIL: not for --help

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise click.BadParameter(f"{out} exists and is not empty; pass --overwrite to replace the corpus "
                                     "in it", param_hint="OUT")
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        (out / CORPUS_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


@click.group()
def main() -> None:
    """Data utilities for clip-kd-cache."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Training samples (one caption each); 0 skips the split.")
@click.option("--val", default=500, show_default=True, type=click.IntRange(min=0),
              help="Validation samples (3-5 captions each, one per line); 0 skips the split.")
@click.option("--zeroshot", default=500, show_default=True, type=click.IntRange(min=0),
              help="Zero-shot classification samples (label = colour and shape of the main object); 0 skips it.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Samples per tar shard.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Corpus seed: the same seed and options give byte-identical shards.")
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(16, 1024),
              help="Side of the square images, in pixels.")
@click.option("--workers", default=_default_workers, show_default="CPUs, at most 8", type=click.IntRange(min=1),
              help="Processes writing shards in parallel (the output does not depend on it).")
@click.option("--overwrite", is_flag=True, help="Replace the splits and corpus.json already in OUT.")
def synth(out: Path, train: int, val: int, zeroshot: int, shard_size: int, seed: int, image_size: int,
          workers: int, overwrite: bool) -> None:
    """Write the synthetic image-caption corpus to OUT: OUT/{train,val,zeroshot}/NNNNN.tar (webdataset
    shards of <key>.jpg/.txt/.json), OUT/zeroshot/{classnames,templates}.txt and OUT/corpus.json."""
    sizes = {"train": train, "val": val, "zeroshot": zeroshot}
    total = sum(sizes.values())
    if total == 0:
        raise click.UsageError("nothing to generate: --train, --val and --zeroshot are all 0")
    _prepare_output(out, overwrite)
    from common.synth import generate_corpus

    start = time.perf_counter()
    generate_corpus(out, sizes, shard_size=shard_size, seed=seed, image_size=image_size, workers=workers,
                    progress=True)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{n} {split}" for split, n in sizes.items() if n)
    click.echo(f"wrote {counts} samples to {out} in {elapsed:.1f} s ({total / elapsed:.0f} samples/s, "
               f"{workers} worker{'s' if workers > 1 else ''})")


if __name__ == "__main__":
    main()
