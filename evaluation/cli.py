"""`kd-eval`: retrieval and zero-shot evaluation of CLIP models (or of a teacher cache), and side-by-side
comparisons. Results are written in CLIP_benchmark's JSON shape; tables go to stdout."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from common.defaults import MAIN_TEACHER, ON_ERROR_CHOICES, is_hub_model
from common.errors import (NON_NEGATIVE, POSITIVE, DataPatternGroup, check_device, reported_errors,
                           run_reporting_errors)
from evaluation.layout import shard_spec

# The evaluation modules (torch, open_clip, zarr, faiss) are imported where a command runs, so that --help and
# option errors answer at once.

EXISTING_FILE = click.Path(exists=True, dir_okay=False)
TEMPLATES_HELP = ("prompt templates, one per line, with {c} or {} for the class name (default: templates.txt or "
                  "zeroshot_classification_templates.txt beside the class names, else 'a photo of a {c}.'; "
                  "which were used is printed and recorded in the result JSON)")


def parse_ks(ctx, param, value: str) -> tuple[int, ...]:
    """click callback: '1,5,10' -> (1, 5, 10)."""
    try:
        ks = tuple(int(k) for k in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 1,5,10") from None
    if min(ks) < 1:
        raise click.BadParameter(f"{value!r}: every k must be >= 1")
    return ks


def write_json(result: dict, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {output}")


def model_options(fn):
    """The options every single-model command shares."""
    for option in reversed([
        click.option("--model", default=None, help="open_clip model name, model config JSON, or hub model "
                                                   "(hf-hub:ORG/REPO, local-dir:PATH)"),
        click.option("--checkpoint", type=click.Path(), default=None,
                     help="local weights of --model (safetensors, or a torch state_dict); a kd-train run folder "
                          "needs none: give --model local-dir:RUN"),
        click.option("--random-weights", is_flag=True,
                     help="evaluate the randomly initialised model (a chance-level baseline) instead of --checkpoint"),
        click.option("--data", required=True, help="shards (brace pattern, directory, or '::'-separated list; "
                                                   "paths or URLs), or a CLIP_benchmark webdataset root (<root>/test/*.tar)"),
        click.option("--batch-size", default=256, show_default=True, type=POSITIVE),
        click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu or cuda"),
        click.option("--workers", default=2, show_default=True, type=NON_NEGATIVE, help="DataLoader decoding workers"),
        click.option("--on-error", type=click.Choice(ON_ERROR_CHOICES), default="raise", show_default=True,
                     help="skip: drop undecodable samples (counted) instead of stopping"),
        click.option("--output", type=click.Path(dir_okay=False), default=None, help="result JSON to write"),
        click.option("--update-card", type=click.Path(exists=True, file_okay=False), default=None,
                     help="kd-train run folder whose model card (README.md) gets this result; the model must be "
                          "that run's student (--model local-dir:RUN)"),
    ]):
        fn = option(fn)
    return fn


def require_weights(kwargs: dict) -> None:
    """A model without weights scores at chance: evaluate one only when asked to (pops --random-weights)."""
    random_weights = kwargs.pop("random_weights")
    if random_weights and (kwargs["checkpoint"] or kwargs.get("cache")):
        raise click.UsageError(f"--random-weights and {'--cache' if kwargs.get('cache') else '--checkpoint'} "
                               f"exclude each other")
    if not (random_weights or kwargs["checkpoint"] or kwargs.get("cache") or is_hub_model(kwargs["model"] or "")):
        raise click.UsageError("give --checkpoint (the model's weights), or --random-weights to evaluate the "
                               "randomly initialised model (an hf-hub: or local-dir: model brings its own weights)")


@click.group(cls=DataPatternGroup)
@click.option("-v", "--verbose", "--debug", "verbose", is_flag=True, help="debug log, with error tracebacks")
def main(verbose: bool):
    """Evaluate CLIP models and teacher caches: retrieval recall@k, zero-shot accuracy, comparisons."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")


def updated_card(update_card: str | None, result: dict, clip) -> dict:
    """The result, recorded in the run's model card when --update-card names one."""
    if update_card:
        from common.model_card import record_eval
        click.echo(f"wrote {record_eval(Path(update_card), result, clip.fingerprint)}")
    return result


def evaluate_retrieval(model, checkpoint, cache, data, k, index, batch_size, device, workers, on_error,
                       first_caption, update_card=None, cache_teacher=MAIN_TEACHER) -> dict:
    """Retrieval result JSON of a model (every caption, or the first) or of a cache's stored embeddings."""
    from common.cache import CacheStore
    from common.corpus import Corpus
    from common.models import create_clip
    from evaluation.encode import cache_split, encode_split
    from evaluation.tasks import retrieval_result, weights_label

    corpus = Corpus.open(shard_spec(data), on_error=on_error)
    clip = None
    if cache:
        store = CacheStore(cache, cache_teacher)
        split = cache_split(store, corpus, on_error)
        model, pretrained = model or store.attrs["teacher"]["model"], store.attrs["teacher"]["pretrained"]
    else:
        clip = create_clip(model, checkpoint, device=device)
        split = encode_split(clip, corpus, batch_size, workers, "first" if first_caption else "all", on_error)
        pretrained = checkpoint
    click.echo(f"{data}: {split.summary()}")
    result = retrieval_result(split, data, model, pretrained or weights_label(model, None), k, index)
    return updated_card(update_card, result, clip)


@main.command()
@model_options
@click.option("--cache", default=None,
              help="evaluate a teacher cache's stored embeddings instead of running a model")
@click.option("--cache-teacher", default=MAIN_TEACHER, show_default=True,
              help="with --cache: which of its teachers (`kd-cache info` lists them)")
@click.option("--k", "k", default="1,5,10", show_default=True, callback=parse_ks, help="recall cut-offs")
@click.option("--index", type=click.Choice(["flat", "ivf", "hnsw"]), default="flat", show_default=True,
              help="FAISS index: flat = exact; ivf / hnsw also report their recall vs exact search")
@click.option("--first-caption", is_flag=True,
              help="use only each sample's first caption (what caches store; implied by --cache)")
def retrieval(output, **kwargs):
    """Image->text and text->image recall@k on a split, every caption of a sample counting as a positive."""
    if kwargs["cache"] and kwargs["checkpoint"]:
        raise click.UsageError("--checkpoint and --cache exclude each other: a cache holds its teacher's embeddings")
    if kwargs["cache"] and kwargs["update_card"]:
        raise click.UsageError("--update-card records a run's student: a --cache holds its teacher's embeddings")
    if not kwargs["cache"] and not kwargs["model"]:
        raise click.UsageError("give --model (with --checkpoint), or --cache")
    require_weights(kwargs)
    with reported_errors(store=kwargs["cache"]):
        result = evaluate_retrieval(**kwargs)
    from evaluation.retrieval import without_aliases
    from evaluation.zeroshot import format_table

    click.echo(format_table(without_aliases(result["metrics"])))
    write_json(result, output)


def evaluate_zeroshot(model, checkpoint, data, classnames, templates, batch_size, device, workers,
                      on_error, update_card=None) -> dict:
    """Zero-shot classification result JSON: images against per-class mean prompt embeddings; it records the
    templates used and their source."""
    from common.corpus import Corpus
    from common.models import create_clip
    from evaluation.encode import encode_split
    from evaluation.tasks import ZeroshotTask, weights_label, zeroshot_result

    task = ZeroshotTask.load(data, classnames, templates)
    clip = create_clip(model, checkpoint, device=device)
    split = encode_split(clip, Corpus.open(shard_spec(data), on_error=on_error), batch_size, workers, "none",
                         on_error)
    click.echo(f"{data}: {split.summary()}, {task.describe()}")
    result = zeroshot_result(clip, split, task, model, weights_label(model, checkpoint), batch_size)
    return updated_card(update_card, result, clip)


@main.command()
@model_options
@click.option("--classnames", type=EXISTING_FILE, default=None,
              help="class names, line i = class i (default: classnames.txt in the dataset root or --data folder)")
@click.option("--templates", type=EXISTING_FILE, default=None, help=TEMPLATES_HELP)
def zeroshot(output, **kwargs):
    """Zero-shot classification (acc1, acc5, mean per-class recall); labels from each sample's `.cls`, or the
    `label` of its `.json`."""
    if not kwargs["model"]:
        raise click.UsageError("give --model")
    require_weights(kwargs)
    result = run_reporting_errors(evaluate_zeroshot, **kwargs)
    from evaluation.zeroshot import format_table

    click.echo(format_table(result["metrics"]))
    write_json(result, output)


def run_comparison(entry, data, teacher_entry, baseline_entry, zeroshot_data, classnames, templates, k, batch_size,
                   device, workers):
    """Parse the entries and the zero-shot task, then compare."""
    from evaluation.compare import Entry, compare
    from evaluation.tasks import ZeroshotTask

    task = None
    if zeroshot_data:
        task = ZeroshotTask.load(zeroshot_data, classnames, templates)
        click.echo(f"{zeroshot_data}: {task.describe()}")
    return compare([Entry.parse(e) for e in entry], data, teacher_entry, task, k, batch_size, device, workers,
                   baseline_entry)


@main.command(name="compare")
@click.option("--entry", multiple=True, required=True,
              help="NAME=MODEL[:CHECKPOINT], repeatable, e.g. --entry baseline=kd-demo-student:runs/b/student.pt")
@click.option("--data", required=True, help="retrieval split (shards)")
@click.option("--teacher-entry", default=None, help="entry the others are aligned to (default: the first)")
@click.option("--baseline-entry", default=None,
              help="entry the others are measured against: a 'vs baseline' column and a one-line verdict")
@click.option("--zeroshot-data", default=None,
              help="zero-shot split: shards or a CLIP_benchmark root (classnames.txt found in it or given)")
@click.option("--classnames", type=EXISTING_FILE, default=None,
              help="default: classnames.txt in the --zeroshot-data root or folder")
@click.option("--templates", type=EXISTING_FILE, default=None, help=TEMPLATES_HELP)
@click.option("--k", "k", default="1,5,10", show_default=True, callback=parse_ks)
@click.option("--batch-size", default=256, show_default=True, type=POSITIVE)
@click.option("--device", default="cpu", show_default=True, callback=check_device)
@click.option("--workers", default=2, show_default=True, type=NON_NEGATIVE)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="write the table as markdown")
@click.option("--figure", type=click.Path(dir_okay=False), default=None, help="write a PNG figure")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write all results as JSON")
def compare_command(markdown, figure, output, **kwargs):
    """Several models on one split: retrieval (and zero-shot) metrics and alignment with the teacher entry."""
    if kwargs["classnames"] and not kwargs["zeroshot_data"]:
        raise click.UsageError("--classnames belongs to --zeroshot-data: give the zero-shot split too")
    comparison = run_reporting_errors(run_comparison, **kwargs)
    from evaluation.compare import markdown_table, write_figure

    table = markdown_table(comparison)
    click.echo(table)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(table)
        click.echo(f"wrote {markdown}")
    if figure:
        click.echo(f"wrote {write_figure(comparison, figure)}")
    write_json(comparison.to_json(), output)


if __name__ == "__main__":
    main()
