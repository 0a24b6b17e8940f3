"""Zero-shot classification at the embedding level, plus CLIP_benchmark-shaped result reporting.

Metric names and semantics follow CLIP_benchmark (fractions in [0, 1]):
  * ``acc1``: top-1 accuracy; ``acc5``: top-min(5, C) accuracy (with fewer than 5 classes the cut-off
    is C, so ``acc5`` is then 1.0 by construction);
  * ``mean_per_class_recall``: top-1 recall averaged over the classes present in ``labels``
    (sklearn's balanced accuracy).
Ties (optimistic, as in `evaluation.retrieval`): a sample is correct at k iff fewer than k classes have a
logit strictly greater than its true class's logit. Logits come from one matrix product, so equal
scores are bit-identical and no tolerance is needed.
"""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.retrieval import as_unit_float32

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0  # CLIP's fixed zero-shot temperature; it does not change any metric
# template files looked for beside the class names: this project's (`kd-data synth`), CLIP_benchmark's
TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")
DEFAULT_TEMPLATE = "a photo of a {c}."  # CLIP's single-prompt baseline, used (and reported) when none is found
DEFAULT_SOURCE = "default"


# ---------------------------------------------------------------- classnames / templates


def _read_lines(path: str | Path, what: str) -> list[str]:
    """Non-blank, stripped lines of a text file; at least one required."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no {what} found (expected one per line)")
    return lines


def read_classnames(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored); duplicates are an error since they are ambiguous."""
    names = _read_lines(path, "class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicated class names {duplicates}")
    return names


def check_template(template: str) -> None:
    """A prompt template has exactly one slot for the class name: `{c}` (CLIP_benchmark) or `{}` (this project)."""
    try:
        slots = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid one-slot format string: {err}") from err
    if not slots:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder (nor '{{c}}') for the class name")
    if slots not in ([""], ["c"]):
        raise ValueError(f"template {template!r} is not a valid one-slot format string: slots {slots}, "
                         f"expected one '{{c}}' or one '{{}}'")


def fill_template(template: str, classname: str) -> str:
    """The prompt of one class: `template` with its `{c}` or `{}` slot filled (format ignores the other)."""
    return template.format(classname, c=classname)


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates such as ``a photo of a {c}.`` or ``a photo of a {}.``, one per line (blank lines ignored)."""
    templates = _read_lines(path, "templates")
    for template in templates:
        check_template(template)
    return templates


@dataclass(frozen=True)
class PromptTemplates:
    """The templates of a zero-shot task and where they came from (a file, or DEFAULT_SOURCE)."""
    templates: list[str]
    source: str

    def describe(self) -> str:
        return f"{len(self.templates)} templates from {self.source}"

    def as_json(self) -> dict:
        """For the result JSON (CLIP_benchmark's --dump_templates key, plus the source)."""
        return {"templates": self.templates, "templates_source": self.source}


def templates_for(classnames_path: str | Path, templates_path: str | Path | None = None) -> PromptTemplates:
    """The prompt templates of a zero-shot task: `templates_path` when given, else the first of TEMPLATE_FILES
    beside the class names file, else [DEFAULT_TEMPLATE] with a warning. `.source` says which."""
    if templates_path is None:
        beside = (Path(classnames_path).with_name(name) for name in TEMPLATE_FILES)
        templates_path = next((path for path in beside if path.is_file()), None)
    if templates_path is not None:
        return PromptTemplates(read_templates(templates_path), str(templates_path))
    log.warning("no %s beside %s: using the single default template %r (pass --templates to choose)",
                " or ".join(TEMPLATE_FILES), classnames_path, DEFAULT_TEMPLATE)
    return PromptTemplates([DEFAULT_TEMPLATE], DEFAULT_SOURCE)


# ---------------------------------------------------------------- classifier and metrics


@torch.no_grad()
def build_classifier(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Zero-shot weights (C, D), float32: per class, the re-normalised mean of its normalised prompt embeddings.

    encode_text maps a list of prompts to their (len, D) embeddings (tokenise + encode, caller's device);
    prompts of all classes are encoded together, `batch_size` at a time.
    """
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template, "
                         f"got {len(classnames)} and {len(templates)}")
    for template in templates:
        check_template(template)
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    embeddings = torch.cat([F.normalize(encode_text(prompts[s:s + batch_size]).float(), dim=-1)
                            for s in range(0, len(prompts), batch_size)])
    per_class = embeddings.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def correct_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean per sample: fewer than k classes score strictly above the true class (optimistic ties)."""
    true_logit = logits.gather(1, labels[:, None])
    return (logits > true_logit).sum(dim=1) < k


def _check_labels(labels, n: int, n_classes: int) -> torch.Tensor:
    """Validate integer class labels (N,) in [0, C)."""
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per image), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def mean_per_class_recall(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """Average over the classes present in `labels` of the fraction of their samples that are correct."""
    classes, inverse = labels.unique(return_inverse=True)
    per_class_hits = torch.zeros(len(classes)).index_add_(0, inverse, correct.float())
    return float((per_class_hits / torch.bincount(inverse)).mean())


def zeroshot_metrics(image_emb, labels, classifier) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall of images (N, D) against classifier rows (C, D).

    Embeddings may be numpy arrays or tensors; both sides are L2-normalised here, logits = 100·cos.
    """
    images = torch.from_numpy(as_unit_float32(image_emb, "image_emb"))
    weights = torch.from_numpy(as_unit_float32(classifier, "classifier"))
    if images.shape[1] != weights.shape[1]:
        raise ValueError(f"embedding dims differ: image_emb has D={images.shape[1]}, "
                         f"classifier has D={weights.shape[1]}")
    labels = _check_labels(labels, len(images), len(weights))
    logits = LOGIT_SCALE * images @ weights.T
    top1 = correct_at_k(logits, labels, 1)
    return {"acc1": float(top1.float().mean()),
            "acc5": float(correct_at_k(logits, labels, min(5, len(weights))).float().mean()),
            "mean_per_class_recall": mean_per_class_recall(top1, labels)}


# ---------------------------------------------------------------- reporting


def result_json(dataset: str, model: str, pretrained: str, task: str, metrics: dict) -> dict:
    """One evaluation result in CLIP_benchmark's JSON shape (task e.g. "zeroshot_classification" or
    "zeroshot_retrieval"); numpy / torch scalar metric values become plain Python numbers."""
    plain = {name: (value.item() if hasattr(value, "item") else value) for name, value in metrics.items()}
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": plain}


def as_percent(value) -> str:
    """A fraction in [0, 1] as a percentage with one decimal (the tables' one unit), None as 'n/a'."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_table(metrics: dict) -> str:
    """Two-column, left-aligned `metric  value (%)` table: fractions as percent with one decimal, None as 'n/a',
    integers (counts) as they are."""
    if not metrics:
        return "(no metrics)"
    width = max(len("metric"), *(len(name) for name in metrics))

    def cell(value) -> str:
        return as_percent(value) if value is None or isinstance(value, (float, np.floating)) else str(value)

    rows = [f"{'metric':<{width}}  value (%)", f"{'-' * width}  ---------"]
    rows += [f"{name:<{width}}  {cell(value)}" for name, value in metrics.items()]
    return "\n".join(rows)
