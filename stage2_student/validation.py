"""Evaluation while training: `kd-train --val-data SPEC [--val-every N]` and `--zeroshot-data DIR`.

What open_clip_train's evaluate() reports, through `evaluation/`'s own code on the live student: image->text and
text->image recall@1/5/10 (FAISS, every caption of a sample a positive, as `kd-eval retrieval`), the validation
CLIP loss (each image with its first caption), and zero-shot top-1 / top-5 (as `kd-eval zeroshot`). Names are
open_clip_train's, under `val/`. The student is evaluated in eval mode and left in the mode it was in, and the
RNG states (torch, CUDA, Python, NumPy) are put back, so that evaluating never changes the training trajectory.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from common.corpus import Corpus
from common.models import LoadedCLIP
from evaluation.encode import encode_split
from evaluation.layout import shard_spec
from evaluation.tasks import ZeroshotTask, retrieval_result, zeroshot_result

KS = (1, 5, 10)
VAL_LOSS = "val/clip_val_loss"
# CLIP_benchmark's metric names (the result JSONs, the card) -> open_clip_train's (metrics.jsonl, the reporters)
RETRIEVAL_NAMES = {f"{theirs}@{k}": f"val/{ours}_R@{k}" for k in KS for theirs, ours in (
    ("text_retrieval_recall", "image_to_text"), ("image_retrieval_recall", "text_to_image"))}
ZEROSHOT_NAMES = {"acc1": "val/zeroshot-top1", "acc5": "val/zeroshot-top5",
                  "mean_per_class_recall": "val/zeroshot-mean_per_class_recall"}


@dataclass
class Validated:
    """One evaluation of the student: the `val/` record and the result JSONs (kd-eval's shape, for the card)."""
    step: int
    record: dict
    results: list[dict]


@contextlib.contextmanager
def rng_untouched(device: str) -> Iterator[None]:
    """Put back every RNG state the block may draw from (a DataLoader draws its base seed from torch's)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    cuda = [torch.device(device)] if device.startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


class Validation:
    """The validation splits of a run, opened (and checked) once when it starts."""

    def __init__(self, val_data: str | None, zeroshot_data: str | None, batch_size: int, loss_batch_size: int,
                 workers: int, on_error: str):
        self.val_data, self.batch_size, self.loss_batch_size = val_data, batch_size, loss_batch_size
        self.workers, self.on_error = workers, on_error
        self.retrieval = Corpus.open(shard_spec(val_data), on_error=on_error) if val_data else None
        self.zeroshot = ((Corpus.open(shard_spec(zeroshot_data), on_error=on_error), ZeroshotTask.load(zeroshot_data))
                         if zeroshot_data else None)

    def metric_names(self) -> list[str]:
        return ([*RETRIEVAL_NAMES.values(), VAL_LOSS] if self.retrieval else []) + \
            (list(ZEROSHOT_NAMES.values()) if self.zeroshot else [])

    def __call__(self, clip: LoadedCLIP, step: int, model: str) -> Validated:
        """Evaluate `clip` (the live student) at `step`; `model` names it in the result JSONs."""
        was_training, device = clip.model.training, str(next(clip.model.parameters()).device)
        record, results = {"step": step}, []
        pretrained = f"step {step}"
        try:
            with rng_untouched(device):
                if self.retrieval is not None:
                    split = encode_split(clip, self.retrieval, self.batch_size, self.workers, "all", self.on_error)
                    result = retrieval_result(split, self.val_data, model, pretrained, KS)
                    record |= {ours: result["metrics"][theirs] for theirs, ours in RETRIEVAL_NAMES.items()}
                    record[VAL_LOSS] = split.contrastive_loss(clip.logit_scale, clip.logit_bias, self.loss_batch_size)
                    results.append(result)
                if self.zeroshot is not None:
                    corpus, task = self.zeroshot
                    images = encode_split(clip, corpus, self.batch_size, self.workers, "none", self.on_error)
                    result = zeroshot_result(clip, images, task, model, pretrained, self.batch_size)
                    record |= {ours: result["metrics"][theirs] for theirs, ours in ZEROSHOT_NAMES.items()}
                    results.append(result)
        finally:
            clip.model.train(was_training)
        return Validated(step, record, results)
