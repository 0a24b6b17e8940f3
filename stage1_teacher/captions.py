"""`kd-cache captions`: synthetic captions in the store, and every teacher's embeddings of them (DataCompDR-style).

An open_clip CoCa captioner writes `num` captions per image (nucleus sampling, seeded per row) into
`captions/text` (N, num) strings, block by block (resumable; blocks split across torchrun ranks). Then each
teacher of the store embeds them into `caption_text_emb` (N, num, D) in its own group, as its `text_emb`
(same dtype, L2-normalised); `kd-cache add-teacher` does the same for a teacher added later. A teacher group's
`captions` attribute holds the content hash of the captions it embedded, so stale embeddings are refused.
Unreadable rows (valid = False) get empty captions and zero embeddings.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
from tqdm import tqdm

from common import dist
from common.cache import (CAPTIONS, CHECKSUM, DTYPES, CacheError, CacheStore, provenance_diff, quantize,
                          read_chunked, teacher_group)
from common.captioner import caption_images
from common.corpus import Corpus
from common.models import LoadedCLIP, clip_from_provenance, create_clip
from common.storage import join, remove_tree
from common.views import CLEAN_VIEW, render

log = logging.getLogger("kd-cache")
TEXT_BATCH = 512  # captions per teacher text forward


@dataclass
class CaptionOptions:
    store: str
    data: str
    captioner: str
    pretrained: str | None = None
    num: int = 5
    seed: int = 0
    seq_len: int | None = None  # tokens per caption at most, markers included (default: the captioner's context)
    batch_size: int = 64
    device: str = "cpu"
    teacher_pretrained: dict[str, str] = field(default_factory=dict)  # teacher name -> checkpoint that moved
    overwrite: bool = False


def captions_attrs(opts: CaptionOptions, captioner: LoadedCLIP, corpus: dict) -> dict:
    attrs = {"captioner": captioner.provenance(), "num": opts.num, "seed": opts.seed, "seq_len": opts.seq_len,
             "generation": "open_clip CoCa.generate, top_p, see common/captioner.py", "corpus": corpus}
    return attrs | {"content_hash": hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()}


def open_or_create_captions(store: CacheStore, opts: CaptionOptions, attrs: dict) -> str:
    """Rank 0: resume captions of the same captioner and options, refuse others (unless --overwrite), or create."""
    root = zarr.open_group(store.path, mode="r+")
    if CAPTIONS in root and opts.overwrite:
        remove_tree(join(store.path, CAPTIONS))
    if CAPTIONS in root and root[CAPTIONS].attrs.get("initialized"):
        diffs = provenance_diff(dict(root[CAPTIONS].attrs), attrs, keys=("captioner", "num", "seed", "seq_len", "corpus"))
        if diffs:
            raise CacheError(f"store {store.path} already has captions made differently:\n  " + "\n  ".join(diffs) +
                             "\nUse the original options, or --overwrite to replace them (and their embeddings).")
        return "complete" if root[CAPTIONS].attrs.get("complete") else "resume"
    if CAPTIONS in root:
        remove_tree(join(store.path, CAPTIONS))  # killed while being created
    n, rows = store.num_rows, store.attrs["build"]["chunk_rows"]
    group = root.create_group(CAPTIONS)
    group.create_array("text", shape=(n, opts.num), chunks=(rows, opts.num), dtype=str, fill_value="",
                       compressors=CHECKSUM)
    group.create_array("blocks_done", shape=(-(-n // rows),), chunks=(1,), dtype="bool", fill_value=False)
    group.attrs.update(attrs | {"complete": False, "initialized": True})
    return "new"


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of a batch starting at `row`: the same captions whatever the number of ranks."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1)[0])


def generate(store: CacheStore, corpus: Corpus, captioner: LoadedCLIP, opts: CaptionOptions, rank: int,
             world: int) -> None:
    group = zarr.open_group(store.path, mode="r+")[CAPTIONS]
    done = read_chunked(group["blocks_done"], 0, group["blocks_done"].shape[0], f"cache {store.path}")
    rows = group["text"].chunks[0]
    valid = store.load("valid")
    mine = np.flatnonzero(~done)[rank::world]
    with tqdm(total=len(mine), unit="block", desc=f"captions (rank {rank})", disable=rank != 0 and world > 1,
              dynamic_ncols=True) as bar:
        for block in mine:
            start, stop = int(block) * rows, min((int(block) + 1) * rows, store.num_rows)
            texts = np.full((stop - start, opts.num), "", dtype=object)
            samples = [s for s in corpus.read(start, stop, on_error="skip") if valid[s.row]]
            for i in range(0, len(samples), opts.batch_size):
                part = samples[i:i + opts.batch_size]
                if any(s.error for s in part):
                    bad = next(s for s in part if s.error)
                    raise CacheError(f"{bad.shard}/{bad.key}: {bad.error} (readable when the store was built): "
                                     f"the shards changed; rebuild the store")
                images = torch.stack([render(s.image, CLEAN_VIEW, captioner.preprocess) for s in part])
                made = caption_images(captioner, images, opts.num, row_seed(opts.seed, part[0].row), opts.seq_len)
                for s, captions in zip(part, made):
                    texts[s.row - start] = captions
            group["text"][start:stop] = texts.astype(str)
            group["blocks_done"][int(block)] = True
            bar.update(1)


def embed_captions(url: str, group: zarr.Group, teacher: LoadedCLIP, rank: int, world: int) -> None:
    """`caption_text_emb` of one teacher (its group) from the store's captions; skipped when already current."""
    root = zarr.open_group(url, mode="r")
    texts, captions_hash = root[f"{CAPTIONS}/text"], root[CAPTIONS].attrs["content_hash"]
    if group.attrs.get("captions") == captions_hash and "caption_text_emb" in group:
        return
    n, num = texts.shape
    rows, dtype = texts.chunks[0], root.attrs["build"]["dtype"]
    if rank == 0:
        group.create_array("caption_text_emb", shape=(n, num, teacher.embed_dim), chunks=(rows, num,
                           teacher.embed_dim), dtype=DTYPES[dtype], compressors=CHECKSUM, fill_value=0,
                           overwrite=True)
    dist.barrier()
    array = zarr.open_group(url, mode="r+")[f"{group.path}/caption_text_emb"]
    for start in range(rank * rows, n, world * rows):
        flat = texts[start:start + rows].reshape(-1)
        emb = np.zeros((len(flat), teacher.embed_dim), np.float32)
        filled = np.flatnonzero(np.repeat(root["valid"][start:start + rows], num))  # an empty caption is a caption
        for i in range(0, len(filled), TEXT_BATCH):
            part = filled[i:i + TEXT_BATCH]
            emb[part] = teacher.embed_texts(teacher.tokenizer([str(t) for t in flat[part]])).numpy()
        array[start:start + rows] = quantize(emb.reshape(-1, num, teacher.embed_dim), dtype)
    dist.barrier()
    if rank == 0:
        group.attrs["captions"] = captions_hash


def build_captions(opts: CaptionOptions) -> str:
    """Generate (or resume) the store's synthetic captions, then embed them with each of its teachers."""
    if opts.num < 1:
        raise ValueError(f"--per-image must be >= 1, got {opts.num}")
    rank, world = dist.init_distributed(opts.device)
    device = dist.local_device(opts.device)
    store = CacheStore(opts.store)
    corpus = Corpus.open(opts.data, on_error="skip", known=[store.index()])
    diffs = provenance_diff(store.attrs, {"corpus": corpus.description()}, keys=("corpus",))
    if diffs:
        raise CacheError(f"store {opts.store} was built from other data than --data {opts.data}:\n  " +
                         "\n  ".join(diffs))
    captioner = create_clip(opts.captioner, opts.pretrained, device=device)
    captioner.model.eval()
    attrs = captions_attrs(opts, captioner, store.attrs["corpus"])
    decision: tuple[str, str] = ("ok", "")
    if rank == 0:
        try:
            decision = ("ok", open_or_create_captions(store, opts, attrs))
        except CacheError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(decision)
    if decision[0] == "error":
        raise CacheError(decision[1])
    if decision[1] != "complete":
        generate(store, corpus, captioner, opts, rank, world)
        dist.barrier()
        if rank == 0:
            zarr.open_group(store.path, mode="r+")[CAPTIONS].attrs["complete"] = True
    del captioner
    unknown = set(opts.teacher_pretrained) - set(store.teacher_names())
    if unknown:
        raise CacheError(f"--teacher-pretrained names {sorted(unknown)}, not teachers of {opts.store} "
                         f"({', '.join(store.teacher_names())})")
    for name in store.teacher_names():
        view = store.teacher(name)
        teacher = clip_from_provenance(view.attrs["teacher"], opts.teacher_pretrained.get(name), device)
        teacher.model.eval()
        embed_captions(store.path, teacher_group(store.path, name), teacher, rank, world)
        log.info("teacher %s embedded the captions", name)
    if rank == 0:
        log.info("captions of %s: %d per image, %d rows, embedded by %s", opts.store, opts.num, store.num_rows,
                 ", ".join(store.teacher_names()))
    return opts.store
