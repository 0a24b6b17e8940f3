"""`kd-train`: stage two."""
from __future__ import annotations

import logging
import os

import click

from common.defaults import DEFAULT_LOSSES, MODES, ON_ERROR_CHOICES, PRECISION_CHOICES
from common.errors import (NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT, PROBABILITY, SEED,
                           DataPatternCommand, check_device, reported_errors)


def check_losses(ctx, param, value: str) -> str:
    """click callback for --losses: a spec that does not parse is refused with the other options."""
    # the loss registry needs torch: imported here, so that --help and the other options' errors stay fast
    from stage2_student.losses import LossSpecError, parse_loss_spec

    try:
        parse_loss_spec(value)
    except LossSpecError as e:
        raise click.BadParameter(str(e)) from e
    return value


@click.command(cls=DataPatternCommand)
@click.option("--data", required=True, help="training shards (brace pattern, directory or '::' list)")
@click.option("--out", required=True, type=click.Path(), help="run folder: an open_clip hub folder (load it as local-dir:OUT), its model card, resume.pt, metrics.jsonl")
@click.option("--student", required=True, help="open_clip model name, model config JSON, or hub model (hf-hub:ORG/REPO, local-dir:PATH: its weights are the start)")
@click.option("--cache", default=None, type=click.Path(), help="teacher cache built by `kd-cache build`")
@click.option("--losses", default=DEFAULT_LOSSES, show_default=True, callback=check_losses,
              help="name[:weight],... e.g. fd:2000,icl:1,crd:1; 'task' alone trains plain CLIP")
@click.option("--teacher-targets", type=click.Choice(MODES), default="auto", show_default=True,
              help="auto: cache, else live teacher; cache: refuse what the cache cannot serve; live: always teacher")
@click.option("--teacher", default=None, help="live teacher when no --cache (with --teacher-targets live)")
@click.option("--teacher-pretrained", default=None,
              help="live teachers' weights, if moved since the cache was built: PATH, or NAME=PATH,NAME=PATH")
@click.option("--teachers", default=None,
              help="the cache's teachers to learn from: NAME,NAME (see `kd-cache info`) or 'all' [default: main, "
                   "the build's teacher]")
@click.option("--synthetic-captions", default=0.0, show_default=True, type=PROBABILITY,
              help="probability that a sample shows one of the cache's synthetic captions (seeded per sample and "
                   "epoch) instead of its own")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=2),
              help="global batch (a multiple of the torchrun world size)")
@click.option("--epochs", default=1, show_default=True, type=POSITIVE)
@click.option("--steps", default=None, type=POSITIVE, help="train this many steps instead of --epochs")
@click.option("--lr", default=1e-3, show_default=True, type=POSITIVE_FLOAT)
@click.option("--wd", default=0.1, show_default=True, type=NON_NEGATIVE_FLOAT)
@click.option("--warmup", default=10000, show_default=True, type=NON_NEGATIVE,
              help="linear warm-up steps, then cosine (capped at 10% of the run's steps)")
@click.option("--grad-clip", default=None, type=POSITIVE_FLOAT, help="clip the gradient norm to this value")
@click.option("--augment", is_flag=True, help="random crops: the cache's stored views, else fresh crops (live)")
@click.option("--batching", type=click.Choice(["shuffle", "cache"]), default="shuffle", show_default=True,
              help="cache: replay the build's gradient batches (GD then uses the cached gradients)")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="auto: bf16 autocast on a GPU that has it, else fp32; amp: fp16 autocast with a GradScaler "
                   "(V100 / T4), whose skipped steps are counted (amp_skipped_steps), not failures")
@click.option("--accum-freq", default=1, show_default=True, type=POSITIVE,
              help="micro-batches of --batch-size per optimizer step: the step's batch is --batch-size x "
                   "--accum-freq (open_clip's feature caching: the exact big-batch gradient for pooled losses)")
@click.option("--local-loss", is_flag=True,
              help="each rank computes its own rows against the global batch (open_clip's --local-loss; same "
                   "gradients, 1/W of the logits' memory); losses without a local form keep the global one")
@click.option("--grad-checkpointing", is_flag=True,
              help="recompute the towers' blocks in the backward instead of storing activations (less memory)")
@click.option("--torchcompile", is_flag=True, help="torch.compile the student's towers")
@click.option("--device", default="cpu", show_default=True, callback=check_device)
@click.option("--workers", default=2, show_default=True, type=NON_NEGATIVE)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--shuffle-buffer", default=1000, show_default=True, type=POSITIVE)
@click.option("--on-error", type=click.Choice(ON_ERROR_CHOICES), default="raise", show_default=True,
              help="an unreadable sample stops the run (raise), or leaves its batch and is counted (skip)")
@click.option("--log-every", default=10, show_default=True, type=POSITIVE)
@click.option("--save-every", default=500, show_default=True, type=POSITIVE,
              help="save every N steps (also at each epoch's end, and on SIGINT/SIGTERM)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its resume.pt")
@click.option("--overwrite", is_flag=True, help="replace the run in --out (a non-empty --out is refused otherwise)")
@click.option("--init", default=None, help="student initial weights: open_clip checkpoint, pretrained tag, or hub model of the same architecture")
@click.option("--target-memory-gb", default=None, type=POSITIVE_FLOAT,
              help="memory for cached targets per node, shared by its ranks: larger targets are read chunk-aware "
                   "instead of held whole (default: half the RAM)")
@click.option("--report-to", default=None,
              help="also log the metrics to tensorboard (event files in --out/tensorboard) and/or wandb: "
                   "tensorboard,wandb (each an extra: pip install 'clip-kd-cache[tensorboard,wandb]')")
@click.option("--wandb-project-name", default="clip-kd", show_default=True, help="the W&B project")
@click.option("--name", default=None, help="the W&B run's name [default: the --out folder's name]")
@click.option("-v", "--verbose", "--debug", "verbose", is_flag=True, help="debug log, with error tracebacks")
def main(verbose: bool, **kwargs):
    """Train a CLIP student against a teacher cache (live teacher as fallback)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")
    from stage2_student.train import TrainOptions, train  # heavy (torch, open_clip, zarr): not for --help

    with reported_errors(store=kwargs["cache"], out=kwargs["out"]):
        summary = train(TrainOptions(**kwargs))
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not per torchrun process
        click.echo(summary)


if __name__ == "__main__":
    main()
