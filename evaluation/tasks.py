"""The two evaluation tasks on a loaded model, as every caller runs them: `kd-eval retrieval` / `zeroshot` /
`compare` on models they load, and `kd-train --val-data` / `--zeroshot-data` on the student while it trains.

Each takes the split's embeddings (`evaluation.encode`) and returns the result JSON in CLIP_benchmark's shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from common.defaults import is_hub_model
from common.models import LoadedCLIP
from evaluation.encode import EncodedSplit, encode_classifier
from evaluation.layout import classnames_file
from evaluation.retrieval import IndexKind, retrieval_metrics
from evaluation.zeroshot import PromptTemplates, read_classnames, result_json, templates_for, zeroshot_metrics

RETRIEVAL_TASK, ZEROSHOT_TASK = "zeroshot_retrieval", "zeroshot_classification"
RANDOM_INIT = "random-init"  # the `pretrained` reported for a model evaluated without weights


def weights_label(model: str, checkpoint: str | None) -> str:
    """The `pretrained` a result reports: the checkpoint, a hub model's own weights (its name), or random-init."""
    return checkpoint or (model if is_hub_model(model) else RANDOM_INIT)


@dataclass(frozen=True)
class ZeroshotTask:
    """A zero-shot classification split with its class names and prompt templates."""
    data: str
    classnames: list[str]
    templates: PromptTemplates
    classnames_source: str = ""

    @classmethod
    def load(cls, data: str, classnames: str | None = None, templates: str | None = None) -> "ZeroshotTask":
        """The class names (`--classnames`, else classnames.txt of the split) and templates (`--templates`, else
        the files beside the class names) of the split `data`."""
        path = classnames_file(data, classnames)
        return cls(data, read_classnames(path), templates_for(path, templates), str(path))

    def describe(self) -> str:
        return f"{len(self.classnames)} classes from {self.classnames_source}, {self.templates.describe()}"


def retrieval_result(split: EncodedSplit, dataset: str, model: str, pretrained: str, ks: Sequence[int] = (1, 5, 10),
                     index: IndexKind = "flat") -> dict:
    """Image->text and text->image recall@k of a split's embeddings (FAISS)."""
    metrics = retrieval_metrics(split.image_emb, split.text_emb, split.text_to_image, ks, index)
    return result_json(dataset, model, pretrained, RETRIEVAL_TASK, metrics)


def zeroshot_result(clip: LoadedCLIP, images: EncodedSplit, task: ZeroshotTask, model: str, pretrained: str,
                    batch_size: int = 256) -> dict:
    """Zero-shot accuracy of `clip` on the images of `task`'s split: against per-class mean prompt embeddings;
    the result records the templates used and their source."""
    classifier = encode_classifier(clip, task.classnames, task.templates.templates, batch_size)
    metrics = zeroshot_metrics(images.image_emb, images.require_labels(), classifier)
    return result_json(task.data, model, pretrained, ZEROSHOT_TASK, metrics) | task.templates.as_json()
