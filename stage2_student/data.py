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
from torch.utils.data import Dataset, Sampler

import zarr

from common.cache import ChunkedRows
from common.corpus import Corpus, CorpusError, check_digest
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


class BatchOrder:
    """The micro-batches of each epoch, a pure function of (seed, epoch): steps of `batch_size * accum_freq` rows
    (drop_last) from the shuffled order, or from the build's gradient batches (`replay`, --batching cache), each cut
    into `accum_freq` micro-batches of `batch_size` rows. Computed once per epoch in each process that reads."""

    def __init__(self, corpus: Corpus, usable: np.ndarray, seed: int, buffer: int, batch_size: int,
                 accum_freq: int = 1, replay: np.ndarray | None = None):
        self.corpus, self.usable, self.seed, self.buffer = corpus, usable, seed, buffer
        self.batch_size, self.accum_freq, self.replay = batch_size, accum_freq, replay
        self._epoch: tuple[int, np.ndarray] | None = None

    def micro_batches(self, epoch: int) -> np.ndarray:
        """(steps * accum_freq, batch_size) corpus rows of an epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            if self.replay is not None:
                steps = self.replay[np.random.default_rng([self.seed, epoch]).permutation(len(self.replay))]
            else:
                rows = shuffled_rows(self.corpus, self.usable, self.seed, epoch, self.buffer)
                step_rows = self.batch_size * self.accum_freq
                steps = rows[:len(rows) // step_rows * step_rows].reshape(-1, step_rows)
            self._epoch = (epoch, steps.reshape(-1, self.batch_size))
        return self._epoch[1]

    def steps_per_epoch(self) -> int:
        return len(self.micro_batches(0)) // self.accum_freq


class MicroBatchSampler(Sampler):
    """(epoch, micro-batch) pairs from a step on to the run's last step: one DataLoader (persistent workers) for
    the whole run, across epochs."""

    def __init__(self, start_epoch: int, start_micro: int, micro_per_epoch: int, total_micro: int):
        self.start = start_epoch * micro_per_epoch + start_micro
        self.micro_per_epoch, self.total = micro_per_epoch, total_micro

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        for i in range(self.start, self.total):
            yield divmod(i, self.micro_per_epoch)


class TrainBatches(Dataset):
    """Item (epoch, i): this rank's part of micro-batch i of the epoch, rendered for the student (and for each
    teacher whose targets may come from the live teacher), with the cached pooled targets of the whole global
    micro-batch looked up here, in the worker: every rank knows the global batch and holds the targets."""

    def __init__(self, corpus: Corpus, order: BatchOrder, cache_rows: np.ndarray | None, rank: int, world: int,
                 student: Renderer, teachers: dict[str, Renderer], views: "ViewPolicy",
                 on_error: str = "raise", captions: "CaptionPolicy | None" = None,
                 digests: np.ndarray | None = None, store: str = "", targets: dict | None = None,
                 grad_batches: bool = False):
        self.corpus, self.order, self.cache_rows = corpus, order, cache_rows
        self.digests, self.store = digests, store  # the store's sample digests, by cache row
        self.rank, self.world = rank, world
        self.student, self.teachers, self.views = student, teachers, views
        self.on_error, self.captions = on_error, captions or CaptionPolicy(0.0, 0)
        self.targets, self.grad_batches = targets or {}, grad_batches  # teacher name -> TargetProvider

    def __len__(self) -> int:
        return len(self.order.micro_batches(0))

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, micro = item
        batch = self.order.micro_batches(epoch)[micro]
        planned = np.array_split(batch, self.world)
        samples = self.corpus.read_rows(planned[self.rank], self.on_error)
        if self.digests is not None:
            for s in samples:
                check_digest(s, int(self.digests[self.cache_rows[s.row]]), self.on_error, self.store)
        # with --on-error skip an unreadable sample leaves its batch (one sample smaller); no other sample moves
        kept = np.array([s.error is None for s in samples])
        skipped = [f"{s.shard}/{s.key}: {s.error}" for s in samples if s.error]
        samples = [s for s in samples if s.error is None]
        if not samples:
            raise CorpusError(f"every sample of this rank's part of batch {micro} is unreadable: {skipped[:3]}")
        local = np.array([s.row for s in samples], dtype=np.int64)
        cache_rows = [None if self.cache_rows is None else int(self.cache_rows[s.row]) for s in samples]
        chosen = [self.views.choose(s.key, epoch, row) for s, row in zip(samples, cache_rows)]
        caption = np.array([self.captions.choose(s.key, epoch) for s in samples], dtype=np.int64)
        texts = self.captions.texts([s.caption for s in samples], cache_rows, caption)
        render_for = lambda r: torch.stack([render(s.image, view, r.preprocess)  # noqa: E731
                                            for s, (_, view) in zip(samples, chosen)])
        return {
            "step": micro,
            "skipped": skipped,
            "kept": torch.from_numpy(kept),  # over this rank's planned rows
            "planned": tuple(len(p) for p in planned),  # every rank's planned rows
            "rows": torch.from_numpy(local),
            "cache_rows": torch.from_numpy(self.cache_rows[local]) if self.cache_rows is not None else None,
            "cached": self.cached_targets(batch, epoch),
            "view": torch.tensor([v for v, _ in chosen]),  # stored view number, -1 when the cache lacks it
            "caption": torch.from_numpy(caption),  # synthetic caption number, -1 for the sample's own
            "student_images": render_for(self.student),
            "student_tokens": self.student.tokenizer(texts),
            # inputs of the live teachers (only those that may serve targets the cache cannot)
            "teacher_inputs": {name: {"images": render_for(r), "tokens": r.tokenizer(texts)}
                               for name, r in self.teachers.items()},
        }

    def cached_targets(self, batch: np.ndarray, epoch: int) -> dict[str, dict[str, torch.Tensor]]:
        """Per teacher the cache can serve this global micro-batch for: its pooled targets, as stored, in the
        planned order (rank by rank). Views and captions of other ranks' samples come from their keys (seeded per
        key), so no rank waits for another."""
        if not self.targets or self.cache_rows is None:
            return {}
        rows = self.cache_rows[batch]
        keys = [self.corpus.index.key(int(r)) for r in batch] if (self.views.augment or
                                                                  self.captions.probability) else None
        views = (np.array([self.views.choose(k, epoch, int(r))[0] for k, r in zip(keys, rows)]) if self.views.augment
                 else np.zeros(len(batch), dtype=np.int64))
        captions = (np.array([self.captions.choose(k, epoch) for k in keys], dtype=np.int64)
                    if self.captions.probability else np.full(len(batch), -1, dtype=np.int64))
        out = {}
        for name, provider in self.targets.items():
            stored = provider.lookup(rows, views, captions, self.grad_batches)
            if stored is not None:
                out[name] = {field: torch.from_numpy(np.ascontiguousarray(value)) for field, value in stored.items()}
        return out


class CaptionPolicy:
    """Which caption a sample is shown: its own, or with probability `probability` (seeded per sample key and
    epoch) one of the store's synthetic captions, drawn uniformly. The student, the live teachers and the cached
    targets (`caption_text_emb`) all use the chosen one. Captions are read chunk by chunk (`ChunkedRows`), never
    held whole: N x C strings would cost gigabytes at CC12M scale."""

    def __init__(self, probability: float, seed: int, captions: zarr.Array | None = None, store: str = ""):
        if probability and captions is None:
            raise ValueError("synthetic captions were asked for, but the store has none: run `kd-cache captions`")
        self.probability, self.seed, self.captions, self.store = probability, seed, captions, store
        self.num = 0 if captions is None else captions.shape[1]
        self.reader: ChunkedRows | None = None

    def choose(self, key: str, epoch: int) -> int:
        if not self.probability:
            return -1
        rng = keyed_rng("caption", self.seed, epoch, key)
        return int(rng.integers(self.num)) if rng.random() < self.probability else -1

    def texts(self, own: list[str], cache_rows: list[int | None], chosen: np.ndarray) -> list[str]:
        synthetic = np.flatnonzero(chosen >= 0)
        if not len(synthetic):
            return own
        if self.reader is None:  # opened in the DataLoader worker that reads
            self.reader = ChunkedRows(self.captions, max_chunks=2, what=f"synthetic captions of cache {self.store}")
        rows = np.array([cache_rows[i] for i in synthetic])
        read = self.reader.take(rows)[np.arange(len(rows)), chosen[synthetic]]
        texts = list(own)
        for i, text in zip(synthetic, read):
            texts[i] = str(text)
        return texts


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
