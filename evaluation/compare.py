"""`kd-eval compare`: several models on one split, side by side, with their alignment to the teacher.

Each entry is encoded once per split; retrieval, zero-shot and alignment all read those embeddings. Alignment
(student vs the teacher entry, on the same images and captions) is the CLIP-KD paper's lens on why distillation
losses differ: mean cosine of paired embeddings (only when the widths match: otherwise the spaces differ) and
linear CKA, which compares the geometry of the two embedding sets whatever their widths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.alignment import alignment_metrics
from common.corpus import Corpus
from common.models import create_clip
from common.retrieval import retrieval_metrics
from common.zeroshot import PromptTemplates, result_json, zeroshot_metrics
from evaluation.encode import EncodedSplit, encode_classifier, encode_split
from evaluation.layout import shard_spec

RETRIEVAL_TASK, ZEROSHOT_TASK = "zeroshot_retrieval", "zeroshot_classification"
RANDOM_INIT = "random-init"  # the `pretrained` reported for a model evaluated without weights
ALIGNMENT_COLUMNS = ("image_cosine", "text_cosine", "image_cka", "text_cka")


@dataclass(frozen=True)
class Entry:
    """One model of a comparison: a display name, an open_clip model name / config, optional local weights."""
    name: str
    model: str
    checkpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Entry":
        """`NAME=MODEL[:CHECKPOINT]`, e.g. `baseline=kd-demo-student:runs/b/student.pt`."""
        name, sep, spec = text.partition("=")
        model, _, checkpoint = spec.partition(":")
        if not sep or not name or not model:
            raise ValueError(f"--entry {text!r}: expected NAME=MODEL[:CHECKPOINT], "
                             f"e.g. baseline=kd-demo-student:runs/b/student.pt")
        if checkpoint and not Path(checkpoint).is_file():
            raise ValueError(f"--entry {text!r}: checkpoint {checkpoint} does not exist")
        return cls(name, model, checkpoint or None)


@dataclass(frozen=True)
class ZeroshotTask:
    """A zero-shot classification split with its class names and prompt templates."""
    data: str
    classnames: list[str]
    templates: PromptTemplates


@dataclass
class Evaluated:
    """One entry's embeddings of the retrieval split and its metrics (result JSONs by task)."""
    entry: Entry
    split: EncodedSplit
    results: dict[str, dict] = field(default_factory=dict)
    alignment: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Comparison:
    data: str
    teacher: str
    ks: tuple[int, ...]
    evaluated: list[Evaluated]

    def metrics(self, e: Evaluated) -> dict:
        """All of an entry's numbers in one flat dict: retrieval, zero-shot, alignment."""
        return {k: v for result in e.results.values() for k, v in result["metrics"].items()} | e.alignment

    def columns(self) -> list[str]:
        retrieval = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in self.ks]
        zeroshot = ["acc1", "acc5"] if ZEROSHOT_TASK in self.evaluated[0].results else []
        return retrieval + zeroshot + list(ALIGNMENT_COLUMNS)

    def to_json(self) -> dict:
        return {"dataset": self.data, "teacher": self.teacher,
                "results": [r for e in self.evaluated for r in e.results.values()],
                "alignment": {e.entry.name: e.alignment for e in self.evaluated}}


def evaluate_entry(entry: Entry, data: Corpus, zeroshot: tuple[Corpus, ZeroshotTask] | None, ks: tuple[int, ...],
                   batch_size: int, device: str, workers: int) -> Evaluated:
    """Load one entry, encode each split once, and score retrieval (and zero-shot)."""
    clip = create_clip(entry.model, entry.checkpoint, device=device)
    split = encode_split(clip, data, batch_size, workers)
    pretrained = entry.checkpoint or RANDOM_INIT
    evaluated = Evaluated(entry, split)
    evaluated.results[RETRIEVAL_TASK] = result_json(
        data.spec, entry.name, pretrained, RETRIEVAL_TASK,
        retrieval_metrics(split.image_emb, split.text_emb, split.text_to_image, ks))
    if zeroshot is not None:
        corpus, task = zeroshot
        images = encode_split(clip, corpus, batch_size, workers, captions="none")
        classifier = encode_classifier(clip, task.classnames, task.templates.templates, batch_size)
        evaluated.results[ZEROSHOT_TASK] = result_json(
            task.data, entry.name, pretrained, ZEROSHOT_TASK,
            zeroshot_metrics(images.image_emb, images.require_labels(), classifier)) | task.templates.as_json()
    return evaluated


def alignment_to(student: EncodedSplit, teacher: EncodedSplit) -> dict[str, float | None]:
    """Paired cosine (None across widths) and linear CKA of image and caption embeddings, student vs teacher."""
    image = alignment_metrics(student.image_emb, teacher.image_emb)
    text = alignment_metrics(student.text_emb, teacher.text_emb)
    return {"image_cosine": image["paired_cosine"], "text_cosine": text["paired_cosine"],
            "image_cka": image["linear_cka"], "text_cka": text["linear_cka"]}


def compare(entries: list[Entry], data: str, teacher: str | None = None, zeroshot: ZeroshotTask | None = None,
            ks: tuple[int, ...] = (1, 5, 10), batch_size: int = 256, device: str = "cpu",
            workers: int = 0) -> Comparison:
    """Evaluate every entry on `data` (and the zero-shot task); alignment against the entry named `teacher`
    (default: the first entry)."""
    names = [e.name for e in entries]
    if not entries:
        raise ValueError("give at least one --entry NAME=MODEL[:CHECKPOINT]")
    if len(set(names)) != len(names):
        raise ValueError(f"--entry names must be unique, got {names}")
    teacher = teacher or names[0]
    if teacher not in names:
        raise ValueError(f"--teacher-entry {teacher!r} is not one of the entries {names}")
    corpus = Corpus.open(shard_spec(data))
    zeroshot_split = (Corpus.open(shard_spec(zeroshot.data)), zeroshot) if zeroshot else None
    evaluated = [evaluate_entry(e, corpus, zeroshot_split, ks, batch_size, device, workers) for e in entries]
    reference = evaluated[names.index(teacher)].split
    for e in evaluated:
        e.alignment = alignment_to(e.split, reference)
    return Comparison(corpus.spec, teacher, ks, evaluated)


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown_table(comparison: Comparison) -> str:
    """A GitHub-markdown table: one row per entry, one column per metric; alignment is vs the teacher entry."""
    columns = comparison.columns()
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for e in comparison.evaluated:
        metrics = comparison.metrics(e)
        lines.append(f"| {e.entry.name} | " + " | ".join(_cell(metrics[c]) for c in columns) + " |")
    zeroshot = " and zero-shot classification" if "acc1" in columns else ""
    note = (f"Retrieval on `{comparison.data}`{zeroshot}; `*_cosine` / `*_cka`: alignment of paired embeddings "
            f"with the teacher entry `{comparison.teacher}` (cosine n/a when embedding widths differ).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_figure(comparison: Comparison, path: str | Path) -> Path:
    """PNG: recall@k bars per model (both directions), and histograms of each model's paired-caption cosine."""
    from matplotlib.figure import Figure  # slow to import, and only --figure needs it

    recall_columns = [c for c in comparison.columns() if "_R@" in c]
    figure = Figure(figsize=(13, 4.5), layout="constrained")  # a bare Figure renders with Agg: no pyplot state
    bars, hist = figure.subplots(1, 2, width_ratios=(3, 2))
    width = 0.8 / len(comparison.evaluated)
    similarities = [e.split.paired_similarity() for e in comparison.evaluated]
    bins = np.histogram_bin_edges(np.concatenate(similarities), bins=30)  # shared, so the models compare
    for i, (e, similarity) in enumerate(zip(comparison.evaluated, similarities)):
        metrics = comparison.metrics(e)
        bars.bar(np.arange(len(recall_columns)) + i * width, [metrics[c] for c in recall_columns], width,
                 label=e.entry.name)
        hist.hist(similarity, bins=bins, alpha=0.5, label=e.entry.name)
    bars.set_xticks(np.arange(len(recall_columns)) + 0.4 - width / 2, recall_columns)
    bars.set(ylim=(0, 1), ylabel="recall", title=f"retrieval on {Path(comparison.data).name}")
    bars.legend()
    hist.set(xlabel="cosine(image, its caption)", ylabel="captions", title="paired-caption similarity")
    hist.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
