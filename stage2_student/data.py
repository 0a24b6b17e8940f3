"""Training data: corpus samples joined to cache rows, in a seeded shuffled order, rendered for each model.

The order of an epoch is a pure function of (seed, epoch): shards are shuffled, then rows are shuffled locally
(webdataset-style buffer), computed on row numbers from the corpus index before anything is decoded.
A global batch is a slice of that order; each rank takes its contiguous part, so gathering across ranks
rebuilds the global batch in order. Resuming at step k therefore needs no replay of the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from common.corpus import Corpus, CorpusError
from common.models import LoadedCLIP
from common.views import CLEAN_VIEW, DEFAULT_SCALE, View, keyed_rng, render, sample_view, view_from_arrays


def shuffled_rows(corpus: Corpus, usable: np.ndarray, seed: int, epoch: int, buffer: int) -> np.ndarray:
    """Shard order shuffled, then a local shuffle within about `buffer` rows, on the usable rows.

    The local shuffle sorts positions jittered by U(0, buffer), so a row moves at most `buffer` places, as
    with webdataset's shuffle buffer, in O(N log N) numpy work instead of a Python loop over rows."""
    rng = keyed_rng("order", seed, epoch)
    rows = np.concatenate([np.arange(corpus.first_rows[s], corpus.first_rows[s] + corpus.counts[s])
                           for s in rng.permutation(len(corpus.counts))])
    rows = rows[usable[rows]]
    return rows[np.argsort(np.arange(len(rows)) + rng.uniform(0, buffer, len(rows)), kind="stable")]


@dataclass
class Renderer:
    """One model's way of seeing a sample: its eval preprocessing and its tokenizer."""
    preprocess: object
    tokenizer: object

    @classmethod
    def of(cls, clip: LoadedCLIP) -> "Renderer":
        return cls(clip.preprocess, clip.tokenizer)


class TrainBatches(Dataset):
    """Item `step` of an epoch: this rank's part of global batch `step`, rendered for the student (and for the
    teacher when targets may come from the live teacher)."""

    def __init__(self, corpus: Corpus, batches: np.ndarray, cache_rows: np.ndarray | None, rank: int, world: int,
                 student: Renderer, teacher: Renderer | None, views: "ViewPolicy", epoch: int,
                 on_error: str = "raise"):
        self.corpus, self.batches, self.cache_rows = corpus, batches, cache_rows
        self.rank, self.world, self.epoch = rank, world, epoch
        self.student, self.teacher, self.views = student, teacher, views
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> dict:
        batch = self.batches[step]
        samples = self.corpus.read_rows(np.array_split(batch, self.world)[self.rank], self.on_error)
        # with --on-error skip an unreadable sample leaves its batch (one sample smaller); no other sample moves
        skipped = [f"{s.shard}/{s.key}: {s.error}" for s in samples if s.error]
        samples = [s for s in samples if s.error is None]
        if not samples:
            raise CorpusError(f"every sample of this rank's part of batch {step} is unreadable: {skipped[:3]}")
        local = np.array([s.row for s in samples], dtype=np.int64)
        chosen = [self.views.choose(s.key, self.epoch, None if self.cache_rows is None else self.cache_rows[s.row])
                  for s in samples]
        out = {
            "step": step,
            "skipped": skipped,
            "rows": torch.from_numpy(local),
            "cache_rows": torch.from_numpy(self.cache_rows[local]) if self.cache_rows is not None else None,
            "view": torch.tensor([v for v, _ in chosen]),  # stored view number, -1 when the cache lacks it
            "student_images": torch.stack([render(s.image, view, self.student.preprocess)
                                           for s, (_, view) in zip(samples, chosen)]),
            "student_tokens": self.student.tokenizer([s.caption for s in samples]),
        }
        if self.teacher is not None:
            out["teacher_images"] = torch.stack([render(s.image, view, self.teacher.preprocess)
                                                 for s, (_, view) in zip(samples, chosen)])
            out["teacher_tokens"] = self.teacher.tokenizer([s.caption for s in samples])
        return out


class ViewPolicy:
    """Which view of a sample the student sees: the clean view, or with --augment one of the K views the cache
    stores (a cache hit), or a fresh random crop when the cache stores none (live teacher)."""

    def __init__(self, augment: bool, seed: int, boxes: np.ndarray | None = None, flips: np.ndarray | None = None,
                 scale=DEFAULT_SCALE):
        self.augment, self.seed, self.boxes, self.flips, self.scale = augment, seed, boxes, flips, scale

    @property
    def stored_views(self) -> int:
        return 0 if self.boxes is None else self.boxes.shape[1]

    def choose(self, key: str, epoch: int, cache_row: int | None) -> tuple[int, View]:
        if not self.augment:
            return 0, CLEAN_VIEW
        rng = keyed_rng("view", self.seed, epoch, key)
        if self.stored_views and cache_row is not None:
            v = int(rng.integers(self.stored_views))
            return 1 + v, view_from_arrays(self.boxes[cache_row, v], self.flips[cache_row, v])
        return -1, sample_view(rng, scale=self.scale)
