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

from evaluation.alignment import alignment_metrics
from common.corpus import Corpus
from common.defaults import HUB_SCHEMAS
from common.models import create_clip
from evaluation.tasks import (RETRIEVAL_TASK, ZEROSHOT_TASK, ZeroshotTask, retrieval_result, weights_label,
                              zeroshot_result)
from evaluation.zeroshot import as_percent
from evaluation.encode import EncodedSplit, encode_split
from evaluation.layout import shard_spec

ALIGNMENT_COLUMNS = ("image_cosine", "text_cosine", "image_cka", "text_cka")
VS_BASELINE = "vs baseline"
ZEROSHOT_COLUMNS = ("acc1", "acc5")


@dataclass(frozen=True)
class Entry:
    """One model of a comparison: a display name, an open_clip model name / config, optional local weights."""
    name: str
    model: str
    checkpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Entry":
        """`NAME=MODEL[:CHECKPOINT]`, e.g. `baseline=kd-demo-student:runs/b/student.pt`; a hub MODEL
        (`hf-hub:ORG/REPO`, `local-dir:PATH`) keeps its schema's colon and brings its own weights."""
        name, sep, spec = text.partition("=")
        schema = next((s for s in HUB_SCHEMAS if spec.startswith(s)), "")
        model, _, checkpoint = spec[len(schema):].partition(":")
        model = schema + model
        if not sep or not name or not model:
            raise ValueError(f"--entry {text!r}: expected NAME=MODEL[:CHECKPOINT], "
                             f"e.g. baseline=kd-demo-student:runs/b/student.pt")
        if checkpoint and not Path(checkpoint).is_file():
            raise ValueError(f"--entry {text!r}: checkpoint {checkpoint} does not exist")
        return cls(name, model, checkpoint or None)


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
    baseline: str | None = None  # the entry the others are measured against in the "vs baseline" column

    def metrics(self, e: Evaluated) -> dict:
        """All of an entry's numbers in one flat dict: retrieval, zero-shot, alignment."""
        return {k: v for result in e.results.values() for k, v in result["metrics"].items()} | e.alignment

    def score_columns(self) -> list[str]:
        """The task metrics: recall@k both ways, and zero-shot accuracy when evaluated."""
        retrieval = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in self.ks]
        return retrieval + (list(ZEROSHOT_COLUMNS) if ZEROSHOT_TASK in self.evaluated[0].results else [])

    def columns(self) -> list[str]:
        return self.score_columns() + list(ALIGNMENT_COLUMNS)

    def mean_score(self, e: Evaluated) -> float:
        """The mean of an entry's task metrics (`score_columns`), a fraction."""
        metrics = self.metrics(e)
        return float(np.mean([metrics[c] for c in self.score_columns()]))

    def vs_baseline(self, e: Evaluated) -> float | None:
        """mean_score(e) - mean_score(baseline), a fraction; None without a baseline."""
        if self.baseline is None:
            return None
        baseline = next(b for b in self.evaluated if b.entry.name == self.baseline)
        return self.mean_score(e) - self.mean_score(baseline)

    def verdict(self) -> str | None:
        """One line: each entry other than the baseline and the teacher against the baseline."""
        others = [e for e in self.evaluated if e.entry.name not in (self.baseline, self.teacher)]
        if self.baseline is None or not others:
            return None
        def against_baseline(e: Evaluated) -> str:
            points = round(100 * self.vs_baseline(e), 1)  # as the table shows it
            if points == 0:
                return f"`{e.entry.name}` ties `{self.baseline}`"
            way = "beats" if points > 0 else "trails"
            return f"`{e.entry.name}` {way} `{self.baseline}` by {abs(points):.1f} points"

        parts = [against_baseline(e) for e in others]
        return f"Verdict: {'; '.join(parts)} (mean of {', '.join(self.score_columns())})."

    def to_json(self) -> dict:
        return {"dataset": self.data, "teacher": self.teacher,
                "results": [r for e in self.evaluated for r in e.results.values()],
                "alignment": {e.entry.name: e.alignment for e in self.evaluated}}


def evaluate_entry(entry: Entry, data: Corpus, zeroshot: tuple[Corpus, ZeroshotTask] | None, ks: tuple[int, ...],
                   batch_size: int, device: str, workers: int) -> Evaluated:
    """Load one entry, encode each split once, and score retrieval (and zero-shot)."""
    clip = create_clip(entry.model, entry.checkpoint, device=device)
    split = encode_split(clip, data, batch_size, workers)
    pretrained = weights_label(entry.model, entry.checkpoint)
    evaluated = Evaluated(entry, split)
    evaluated.results[RETRIEVAL_TASK] = retrieval_result(split, data.spec, entry.name, pretrained, ks)
    if zeroshot is not None:
        corpus, task = zeroshot
        images = encode_split(clip, corpus, batch_size, workers, captions="none")
        evaluated.results[ZEROSHOT_TASK] = zeroshot_result(clip, images, task, entry.name, pretrained, batch_size)
    return evaluated


def alignment_to(student: EncodedSplit, teacher: EncodedSplit) -> dict[str, float | None]:
    """Paired cosine (None across widths) and linear CKA of image and caption embeddings, student vs teacher."""
    image = alignment_metrics(student.image_emb, teacher.image_emb)
    text = alignment_metrics(student.text_emb, teacher.text_emb)
    return {"image_cosine": image["paired_cosine"], "text_cosine": text["paired_cosine"],
            "image_cka": image["linear_cka"], "text_cka": text["linear_cka"]}


def compare(entries: list[Entry], data: str, teacher: str | None = None, zeroshot: ZeroshotTask | None = None,
            ks: tuple[int, ...] = (1, 5, 10), batch_size: int = 256, device: str = "cpu",
            workers: int = 0, baseline: str | None = None) -> Comparison:
    """Evaluate every entry on `data` (and the zero-shot task); alignment against the entry named `teacher`
    (default: the first entry); the "vs baseline" column and verdict against the entry named `baseline`."""
    names = [e.name for e in entries]
    if not entries:
        raise ValueError("give at least one --entry NAME=MODEL[:CHECKPOINT]")
    if len(set(names)) != len(names):
        raise ValueError(f"--entry names must be unique, got {names}")
    teacher = teacher or names[0]
    for option, name in (("--teacher-entry", teacher), ("--baseline-entry", baseline)):
        if name is not None and name not in names:
            raise ValueError(f"{option} {name!r} is not one of the entries {names}")
    corpus = Corpus.open(shard_spec(data))
    zeroshot_split = (Corpus.open(shard_spec(zeroshot.data)), zeroshot) if zeroshot else None
    evaluated = [evaluate_entry(e, corpus, zeroshot_split, ks, batch_size, device, workers) for e in entries]
    reference = evaluated[names.index(teacher)].split
    for e in evaluated:
        e.alignment = alignment_to(e.split, reference)
    return Comparison(data, teacher, ks, evaluated, baseline)


def _signed_points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def markdown_table(comparison: Comparison) -> str:
    """A GitHub-markdown table in percent: one row per entry, one column per metric (alignment is vs the teacher
    entry), plus a "vs baseline" column and a one-line verdict when the comparison has a baseline."""
    columns = comparison.columns()
    extra = [VS_BASELINE] if comparison.baseline else []
    lines = ["| model | " + " | ".join(columns + extra) + " |", "|---|" + "---:|" * len(columns + extra)]
    for e in comparison.evaluated:
        metrics = comparison.metrics(e)
        cells = [as_percent(metrics[c]) for c in columns] + [_signed_points(comparison.vs_baseline(e))] * len(extra)
        lines.append(f"| {e.entry.name} | " + " | ".join(cells) + " |")
    zeroshot = " and zero-shot classification" if "acc1" in columns else ""
    note = (f"Percent. Retrieval on `{comparison.data}`{zeroshot}; `*_cosine` / `*_cka`: alignment of paired "
            f"embeddings with the teacher entry `{comparison.teacher}` (cosine n/a when embedding widths differ).")
    if comparison.baseline:
        note += (f" `{VS_BASELINE}`: mean of the recall and accuracy columns minus `{comparison.baseline}`'s, "
                 f"in points.")
    verdict = comparison.verdict()
    return "\n".join(lines) + "\n\n" + note + "\n" + (f"\n{verdict}\n" if verdict else "")


def write_figure(comparison: Comparison, path: str | Path) -> Path:
    """PNG, in percent: recall@k bars per model (both directions), zero-shot accuracy bars when evaluated, and
    histograms of each model's per-image pair margin (positive minus mean negative cosine, `pair_margin`)."""
    from matplotlib.figure import Figure  # slow to import, and only --figure needs it

    recall_columns = [c for c in comparison.score_columns() if "_R@" in c]
    accuracy_columns = [c for c in comparison.score_columns() if c in ZEROSHOT_COLUMNS]
    panels = [(recall_columns, "recall (%)", f"retrieval on {Path(comparison.data).name}")]
    if accuracy_columns:
        panels.append((accuracy_columns, "accuracy (%)", "zero-shot classification"))
    figure = Figure(figsize=(6 + 3.5 * len(panels), 4.5), layout="constrained")  # bare Figure: Agg, no pyplot
    axes = figure.subplots(1, len(panels) + 1, width_ratios=[len(c) for c, _, _ in panels] + [3])
    width = 0.8 / len(comparison.evaluated)
    for ax, (columns, ylabel, title) in zip(axes, panels):
        for i, e in enumerate(comparison.evaluated):
            metrics = comparison.metrics(e)
            ax.bar(np.arange(len(columns)) + i * width, [100 * metrics[c] for c in columns], width,
                   label=e.entry.name)
        ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns)
        ax.set(ylim=(0, 100), ylabel=ylabel, title=title)
        ax.legend()
    hist = axes[-1]
    # raw cosines are not comparable across models (each has its own scale); how far a true pair stands above
    # the others is, and it is what CLIP-KD plots
    margins = [e.split.pair_margin() for e in comparison.evaluated]
    bins = np.histogram_bin_edges(np.concatenate(margins), bins=30)  # shared, so the models compare
    for e, margin in zip(comparison.evaluated, margins):
        hist.hist(margin, bins=bins, alpha=0.5, label=f"{e.entry.name} (median {np.median(margin):.3f})")
    hist.set(xlabel="cos(own captions) − mean cos(others)", ylabel="images", title="pair margin per image")
    hist.legend(fontsize="small")
    figure.supxlabel("Pair margin: an image's cosine with its own captions minus its mean cosine with the other "
                     "captions (as CLIP-KD plots); further right, true pairs stand out more. Unlike raw cosines, it "
                     "compares across models.", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
