"""Embeddings of an evaluation split, from a model (`encode_split`) or from a teacher cache (`cache_split`).

Every `kd-eval` command goes through here, so that retrieval, zero-shot and comparisons see the same images,
captions and labels in the same order: corpus row order, and for each image its captions in `.txt` line order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.cache import CacheStore, dequantize, join_to_cache
from common.contrastive import contrastive_loss
from common.corpus import Corpus, Sample, changed_sample_error, changed_since
from common.models import LoadedCLIP
from evaluation.zeroshot import build_classifier

Captions = Literal["all", "first", "none"]
NO_LABEL = -1


@dataclass
class EncodedSplit:
    """A split's embeddings: images (N, D), captions (M, D) with the image of each caption, and per image its
    key and class label (NO_LABEL where it has none; labels None when the source cannot know them)."""
    image_emb: np.ndarray
    text_emb: np.ndarray
    text_to_image: np.ndarray
    keys: np.ndarray
    labels: np.ndarray | None
    dropped: int = 0  # invalid samples / cache rows left out

    def summary(self) -> str:
        captions = f"{len(self.text_emb)} captions, " if len(self.text_emb) else ""
        return f"{len(self.image_emb)} images, {captions}{self.dropped} invalid samples dropped"

    def pair_margin(self) -> np.ndarray:
        """Per image with a caption: mean cosine with its own captions minus mean cosine with every other image's
        captions (what CLIP-KD plots). Unlike a raw cosine it compares across models, whose similarity scales
        differ; O(N + M) from the caption sum, no N x M matrix."""
        n, m = len(self.image_emb), len(self.text_emb)
        paired = np.einsum("ij,ij->i", self.image_emb[self.text_to_image], self.text_emb)
        own = np.bincount(self.text_to_image, minlength=n)
        positive = np.bincount(self.text_to_image, weights=paired, minlength=n)
        everything = self.image_emb.astype(np.float64) @ self.text_emb.sum(axis=0, dtype=np.float64)
        has = (own > 0) & (own < m)
        return positive[has] / own[has] - (everything[has] - positive[has]) / (m - own[has])

    def contrastive_loss(self, scale: float, bias: float | None, batch_size: int) -> float:
        """open_clip_train's validation loss: each image with its first caption, in batches of `batch_size` in row
        order, the model's own contrastive loss (the sigmoid one for a model with a logit bias), averaged over
        images."""
        _, first = np.unique(self.text_to_image, return_index=True)  # each image's first caption
        image, text = torch.from_numpy(self.image_emb), torch.from_numpy(self.text_emb[first])
        total = sum(len(i) * float(contrastive_loss(i, t, scale, bias))
                    for i, t in zip(image.split(batch_size), text.split(batch_size)))
        return total / len(image)

    def require_labels(self) -> np.ndarray:
        """The class labels, or a ValueError naming the first sample without one (`.cls`, or `label` in its .json)."""
        missing = np.ones(len(self.keys), bool) if self.labels is None else self.labels == NO_LABEL
        if missing.any():
            raise ValueError(f"sample {self.keys[np.argmax(missing)]} has no integer 'label' (a .cls, or in its .json) "
                             f"({int(missing.sum())} of {len(self.keys)} samples lack one): zero-shot "
                             f"classification needs the class index of every image")
        return self.labels


def _label(meta: dict) -> int:
    """A sample's integer class (its `.cls`, or its .json `label`: common.decode puts both in meta), or NO_LABEL."""
    label = meta.get("label")
    return label if isinstance(label, int) and not isinstance(label, bool) else NO_LABEL


def selected_captions(sample: Sample, captions: Captions) -> list[str]:
    """The captions of a sample that get encoded: all its .txt lines, the first, or none."""
    return {"all": sample.captions, "first": sample.captions[:1], "none": []}[captions]


class SplitBatches(Dataset):
    """Item i: rows [i·batch_size, (i+1)·batch_size) decoded, preprocessed and tokenised (in DataLoader workers)."""

    def __init__(self, corpus: Corpus, batch_size: int, clip: LoadedCLIP, captions: Captions, on_error: str):
        self.corpus, self.batch_size, self.captions, self.on_error = corpus, batch_size, captions, on_error
        self.preprocess, self.tokenizer = clip.preprocess, clip.tokenizer

    def __len__(self) -> int:
        return -(-self.corpus.num_samples // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        start = i * self.batch_size
        samples = list(self.corpus.read(start, min(start + self.batch_size, self.corpus.num_samples), self.on_error))
        ok = [s for s in samples if s.error is None]
        texts = [selected_captions(s, self.captions) for s in ok]
        captions = [c for sample_texts in texts for c in sample_texts]
        return {
            "images": torch.stack([self.preprocess(s.image) for s in ok]) if ok else None,
            "tokens": self.tokenizer(captions) if captions else None,
            "captions_per_image": torch.tensor([len(t) for t in texts], dtype=torch.long),
            "keys": [s.key for s in ok],
            "labels": [_label(s.meta) for s in ok],
            "dropped": len(samples) - len(ok),
        }


def encode_split(clip: LoadedCLIP, corpus: Corpus, batch_size: int = 256, workers: int = 0,
                 captions: Captions = "all", on_error: str = "raise") -> EncodedSplit:
    """Run `clip` over every sample of `corpus`: its image and its captions ('all' lines of the .txt, the 'first'
    one that caches store, or 'none' for classification); undecodable samples are dropped with on_error='skip'."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    clip.model.eval()
    device = next(clip.model.parameters()).device
    loader = DataLoader(SplitBatches(corpus, batch_size, clip, captions, on_error), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda")
    images, texts, text_to_image, keys, labels, dropped = [], [], [], [], [], 0
    with tqdm(total=corpus.num_samples, unit="sample", desc=f"encoding {corpus.spec}", dynamic_ncols=True) as bar:
        for batch in loader:
            dropped += batch["dropped"]
            bar.update(len(batch["keys"]) + batch["dropped"])
            if not batch["keys"]:
                continue
            text_to_image.append(len(keys) + torch.arange(len(batch["keys"])).repeat_interleave(
                batch["captions_per_image"]))
            keys += batch["keys"]
            labels += batch["labels"]
            images.append(clip.embed_images(batch["images"]))
            if batch["tokens"] is not None:  # several captions per image: keep text batches at batch_size
                texts += [clip.embed_texts(chunk) for chunk in batch["tokens"].split(batch_size)]
    if not keys:
        raise ValueError(f"data {corpus.spec!r}: no valid sample among {corpus.num_samples} ({dropped} invalid)")
    return EncodedSplit(
        image_emb=torch.cat(images).numpy(),
        text_emb=torch.cat(texts).numpy() if texts else np.zeros((0, clip.embed_dim), np.float32),
        text_to_image=torch.cat(text_to_image).numpy(),
        keys=np.array(keys),
        labels=np.array(labels, dtype=np.int64),
        dropped=dropped,
    )


def cache_split(cache: CacheStore, corpus: Corpus, on_error: str = "raise") -> EncodedSplit:
    """The teacher's embeddings of `corpus` as stored in `cache` (clean view 0, the first caption of each
    sample); rows the build marked invalid are dropped. Refuses data the cache was not built from, and samples
    whose bytes changed since (dropped instead with on_error='skip')."""
    cache.require(["image_emb", "text_emb", "valid"], why="evaluation from a cache")
    rows = join_to_cache(corpus, cache)
    valid = cache.load("valid")[rows]
    if cache.has("sample_crc32c"):  # stores older than sample digests cannot tell
        expected, found = cache.load("sample_crc32c")[rows], corpus.digests()
        changed = np.flatnonzero(expected != found)
        if len(changed) and on_error == "raise":
            first = int(changed[0])
            shard, _ = corpus.locate(first)
            raise changed_sample_error(corpus.index.names[shard], corpus.index.key(first),
                                       changed_since(cache.path, int(found[first]), int(expected[first])) +
                                       f" ({len(changed)} such samples)")
        valid[changed] = False
    rows = rows[valid]
    if not len(rows):
        raise ValueError(f"cache {cache.path}: every row of data {corpus.spec!r} is invalid")
    image = cache.rows("image_emb", rows)
    return EncodedSplit(
        image_emb=dequantize(image[:, 0] if image.ndim == 3 else image),  # the clean view
        text_emb=dequantize(cache.rows("text_emb", rows)),
        text_to_image=np.arange(len(rows)),
        keys=corpus.keys[valid],
        labels=None,
        dropped=int((~valid).sum()),
    )


def encode_classifier(clip: LoadedCLIP, classnames: list[str], templates: list[str],
                      batch_size: int = 256) -> np.ndarray:
    """Zero-shot classifier (C, D) of `clip`: per class the normalised mean of its normalised prompt embeddings."""
    return build_classifier(lambda prompts: clip.embed_texts(clip.tokenizer(prompts)), classnames, templates,
                            batch_size).numpy()
