"""`kd-cache info` and `kd-cache verify`: what a store holds, and whether it is what the teacher computes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.cache import CacheError, CacheStore, provenance_diff
from common.contrastive import clip_loss_grads
from common.corpus import Corpus
from common.models import clip_from_provenance
from common.views import CLEAN_VIEW, render, view_from_arrays

# cosine a recomputed embedding must reach against the stored one
MIN_COSINE = {"fp16": 0.999, "fp32": 0.99999}


def disk_bytes(path: Path) -> tuple[int, int]:
    files = [Path(root) / f for root, _, names in os.walk(path) for f in names]
    return sum(f.stat().st_size for f in files), len(files)


def store_summary(path: str) -> dict:
    store = CacheStore(path)
    attrs, teacher = store.attrs, store.attrs["teacher"]
    size, files = disk_bytes(store.path)
    return {
        "store": str(store.path),
        "rows": store.num_rows,
        "invalid rows": attrs.get("invalid_count", 0),
        "views stored": store.views,
        "embed dim": store.embed_dim,
        "dtype": attrs["build"]["dtype"],
        "arrays": ", ".join(sorted(store.group.array_keys())),
        "teacher": teacher["model"],
        "pretrained": teacher["pretrained"],
        "weights fingerprint": teacher["fingerprint"][:16],
        "teacher logit scale": round(store.teacher_logit_scale, 4),
        "open_clip version": teacher["open_clip_version"],
        "shards": len(attrs["corpus"]["shards"]),
        "grad batches": f"{store.group['grad_batches'].shape[0]} x {attrs['build']['grad_batch']}",
        "chunk rows": attrs["build"]["chunk_rows"],
        "bytes on disk": size,
        "files": files,
        "bytes per sample": round(size / max(store.num_rows, 1), 1),
    }


def check_corpus(store: CacheStore, corpus: Corpus) -> list[str]:
    """Differences between the store's corpus and these shards (names, sizes, counts, keys)."""
    diffs = provenance_diff(store.attrs, {"corpus": corpus.description()}, keys=("corpus",))
    if not diffs:
        stored_keys = store.load("keys")
        mismatch = np.flatnonzero(stored_keys != corpus.keys.astype(str))
        diffs = [f"row {r}: store key {stored_keys[r]}, shard key {corpus.keys[r]}" for r in mismatch[:5]]
    return diffs


def verify_store(path: str, data: str, sample: int, pretrained: str | None, device: str, seed: int) -> dict:
    store = CacheStore(path)
    corpus = Corpus.open(data, on_error="skip")
    lines, ok = [], True
    diffs = check_corpus(store, corpus)
    if diffs:
        raise CacheError(f"store {path} was not built from {data}:\n  " + "\n  ".join(diffs))
    lines.append(f"keys: {corpus.num_samples} rows match the shards")

    teacher = clip_from_provenance(store.attrs["teacher"], pretrained, device)
    lines.append(f"teacher: {teacher.name}, fingerprint {teacher.fingerprint[:12]} matches")
    valid = store.load("valid")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(np.flatnonzero(valid), size=min(sample, int(valid.sum())), replace=False))
    samples = [next(corpus.read(int(r), int(r) + 1, on_error="raise")) for r in rows]
    image_group = store.group["image_emb"]
    boxes = store.load("view_boxes")[rows] if store.views else None
    flips = store.load("view_flips")[rows] if store.views else None
    views = [[CLEAN_VIEW] + [view_from_arrays(boxes[i, v], flips[i, v]) for v in range(store.views)]
             for i in range(len(rows))]
    images = torch.stack([torch.stack([render(s.image, v, teacher.preprocess) for v in vs])
                          for s, vs in zip(samples, views)])
    fresh_image = teacher.embed_images(images.flatten(0, 1)).view(len(rows), 1 + store.views, -1)
    fresh_text = teacher.embed_texts(teacher.tokenizer([s.caption for s in samples]))
    stored_image = torch.from_numpy(image_group.get_orthogonal_selection((rows,)).astype(np.float32))
    stored_image = stored_image.view(len(rows), 1 + store.views, -1)
    stored_text = torch.from_numpy(store.group["text_emb"].get_orthogonal_selection((rows,)).astype(np.float32))
    threshold = MIN_COSINE[store.attrs["build"]["dtype"]]
    for name, fresh, stored in (("image", fresh_image, stored_image), ("text", fresh_text, stored_text)):
        cos = torch.nn.functional.cosine_similarity(fresh, stored, dim=-1)
        good = bool(cos.min() >= threshold)
        ok &= good
        lines.append(f"{name} embeddings: {len(rows)} rows, min cosine {cos.min():.6f} "
                     f"({'>=' if good else 'BELOW'} {threshold})")

    batches = store.load("grad_batches")
    batch = batches[rng.integers(len(batches))]
    batch = batch[batch >= 0]
    image = store.load("image_emb")[batch].astype(np.float32)
    image = torch.from_numpy(image[:, 0] if store.views else image)
    text = torch.from_numpy(store.load("text_emb")[batch].astype(np.float32))
    g_img, g_txt = clip_loss_grads(image, text, store.teacher_logit_scale)
    for name, fresh, stored in (("image_grad", g_img, store.load("image_grad")[batch]),
                                ("text_grad", g_txt, store.load("text_grad")[batch])):
        err = float((fresh - torch.from_numpy(stored)).abs().max() / fresh.abs().max().clamp_min(1e-12))
        good = err < 1e-5
        ok &= good
        lines.append(f"{name}: one gradient batch of {len(batch)} rows recomputed, max relative error {err:.2e}")
    return {"ok": ok, "lines": lines}
