"""`kd-cache build`: run the teacher once over the corpus and write its targets into a Zarr store.

Work is cut into blocks of `chunk_rows` corpus rows, one Zarr chunk each, processed as fixed batches of
`batch_size` rows inside the block. Blocks make the build:
- resumable: a block's data is written before its `blocks_done` marker, so a killed build redoes at most the
  blocks in flight, and re-running the same command gives a store bit-identical to an uninterrupted build;
- splittable: torchrun ranks take disjoint blocks (disjoint chunk files: no write races), and every batch has the
  same rows whatever the number of ranks, so the store equals the single-process one.
Gradients need whole gradient batches drawn from all rows, so they are a last phase on rank 0, computed from the
stored (dtype-rounded) embeddings so that stage two can recompute them exactly.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from common import dist
from common.cache import CHUNK_ROWS, DTYPES, FORMAT_VERSION, CacheError, create_store, provenance_diff, remove_store
from common.contrastive import clip_loss_grads
from common.corpus import Corpus
from common.models import LoadedCLIP, create_clip
from common.views import CLEAN_VIEW, DEFAULT_SCALE, keyed_view, render, views_to_arrays

log = logging.getLogger("kd-cache")


@dataclass
class BuildOptions:
    teacher: str
    data: str
    out: str
    pretrained: str | None = None
    batch_size: int = 256
    grad_batch: int = 1024
    views: int = 0
    device: str = "cpu"
    workers: int = 2
    dtype: str = "fp16"
    on_error: str = "raise"
    overwrite: bool = False
    seed: int = 0
    chunk_rows: int = CHUNK_ROWS
    view_scale: tuple[float, float] = DEFAULT_SCALE

    def check(self) -> None:
        for name in ("batch_size", "grad_batch", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.grad_batch < 2:
            raise ValueError("--grad-batch must be >= 2: a contrastive loss needs negatives")
        if self.views < 0:
            raise ValueError(f"--views must be >= 0, got {self.views}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")


def store_attrs(opts: BuildOptions, teacher: LoadedCLIP, corpus: Corpus) -> dict:
    """Everything that determines the store's content, compared on resume and by stage two."""
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher.provenance(),
        "corpus": corpus.description(),
        "build": {
            "dtype": opts.dtype, "views": opts.views, "seed": opts.seed, "grad_batch": opts.grad_batch,
            "batch_size": opts.batch_size, "chunk_rows": opts.chunk_rows, "view_scale": list(opts.view_scale),
            "caption": "first line of <key>.txt",
        },
        "embed_dim": teacher.embed_dim,
        "teacher_logit_scale": teacher.logit_scale,
    }


class BlockBatches(IterableDataset):
    """DataLoader side: decodes a block's samples and renders every view for the teacher, batch by batch."""

    def __init__(self, corpus: Corpus, blocks: list[int], opts: BuildOptions, teacher: LoadedCLIP):
        self.corpus, self.blocks, self.opts = corpus, blocks, opts
        self.preprocess, self.tokenizer = teacher.preprocess, teacher.tokenizer

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.opts.chunk_rows
        return start, min(start + self.opts.chunk_rows, self.corpus.num_samples)

    def __iter__(self):
        info = get_worker_info()
        mine = self.blocks if info is None else self.blocks[info.id::info.num_workers]
        for block in mine:
            start, stop = self.block_rows(block)
            n_batches = math.ceil((stop - start) / self.opts.batch_size)
            samples = self.corpus.read(start, stop, self.opts.on_error)
            for number in range(n_batches):
                batch = [next(samples) for _ in range(min(self.opts.batch_size, stop - start - number * self.opts.batch_size))]
                yield self.collate(block, number, n_batches, batch)

    def collate(self, block: int, number: int, n_batches: int, samples) -> dict:
        ok = [s for s in samples if s.error is None]
        views = lambda s: [CLEAN_VIEW] + [keyed_view(self.opts.seed, s.key, v, scale=self.opts.view_scale)  # noqa: E731
                                          for v in range(1, self.opts.views + 1)]
        images = torch.stack([torch.stack([render(s.image, v, self.preprocess) for v in views(s)]) for s in ok]) \
            if ok else torch.empty(0)
        return {
            "block": block, "number": number, "n_batches": n_batches,
            "rows": np.array([s.row for s in samples]),
            "valid": np.array([s.error is None for s in samples]),
            "images": images,
            "tokens": self.tokenizer([s.caption for s in ok]) if ok else torch.empty(0, dtype=torch.long),
            "errors": [f"{s.shard}/{s.key}: {s.error}" for s in samples if s.error],
        }


class BlockWriter:
    """Main-process side: gathers a block's batches (they arrive interleaved across workers) and writes it whole."""

    def __init__(self, group: zarr.Group, opts: BuildOptions, embed_dim: int):
        self.group, self.opts, self.embed_dim = group, opts, embed_dim
        self.pending: dict[int, dict] = {}
        self.dtype = np.dtype(DTYPES[opts.dtype])

    def add(self, batch: dict, image_emb: np.ndarray, text_emb: np.ndarray) -> bool:
        block = batch["block"]
        start = block * self.opts.chunk_rows
        if block not in self.pending:
            n = min(self.opts.chunk_rows, self.group["valid"].shape[0] - start)
            self.pending[block] = {
                "image": np.zeros((n, 1 + self.opts.views, self.embed_dim), self.dtype),
                "text": np.zeros((n, self.embed_dim), self.dtype),
                "valid": np.zeros(n, bool), "seen": 0,
            }
        buf = self.pending[block]
        local = batch["rows"][batch["valid"]] - start
        if len(local):
            buf["image"][local] = image_emb
            buf["text"][local] = text_emb
        buf["valid"][batch["rows"] - start] = batch["valid"]
        buf["seen"] += 1
        if buf["seen"] < batch["n_batches"]:
            return False
        self.write(block, self.pending.pop(block))
        return True

    def write(self, block: int, buf: dict) -> None:
        start = block * self.opts.chunk_rows
        stop = start + len(buf["valid"])
        self.group["image_emb"][start:stop] = buf["image"] if self.opts.views else buf["image"][:, 0]
        self.group["text_emb"][start:stop] = buf["text"]
        self.group["valid"][start:stop] = buf["valid"]
        self.group["blocks_done"][block] = True  # last: a block is done only once its data is on disk


def open_or_create(opts: BuildOptions, attrs: dict, corpus: Corpus) -> tuple[zarr.Group | None, str]:
    """Rank 0: resume a matching store, refuse a different one, or create it. Returns (group, state)."""
    out = Path(opts.out)
    if out.exists() and opts.overwrite:
        remove_store(out)
    if out.exists() and not (out / "zarr.json").is_file():
        if any(out.iterdir()):
            raise CacheError(f"--out {out} exists and is not a Zarr store: choose another path or remove it")
        out.rmdir()
    if out.exists():
        group = zarr.open_group(str(out), mode="r+")
        stored = dict(group.attrs)
        if stored.get("initialized"):
            diffs = provenance_diff(stored, attrs)
            if diffs:
                raise CacheError(f"store {out} was built differently:\n  " + "\n  ".join(diffs) +
                                 "\nUse another --out, the original options, or --overwrite to replace it.")
            return group, "complete" if stored.get("complete") else "resume"
        remove_store(out)  # killed while being created: nothing of value in it
    group = create_store(out, attrs, corpus.num_samples, attrs["embed_dim"], opts.views, opts.dtype,
                         opts.chunk_rows, len(corpus.shards))
    group["keys"][:] = np.asarray(corpus.keys, dtype=str)
    group["shard_names"][:] = np.array([s.name for s in corpus.shards], dtype=str)
    group["shard_first_row"][:] = corpus.first_rows
    group["shard_count"][:] = corpus.counts
    group["shard_size"][:] = np.array([s.size for s in corpus.shards], dtype=np.int64)
    if opts.views:
        views = [[keyed_view(opts.seed, k, v, scale=opts.view_scale) for v in range(1, opts.views + 1)]
                 for k in corpus.keys]
        boxes, flips = views_to_arrays(views)
        group["view_boxes"][:] = boxes
        group["view_flips"][:] = flips
    group.attrs["initialized"] = True
    return group, "new"


def encode_batch(teacher: LoadedCLIP, batch: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    images, tokens = batch["images"], batch["tokens"]
    if not len(tokens):
        return None, None
    n, v = images.shape[:2]
    image_emb = teacher.embed_images(images.flatten(0, 1)).view(n, v, -1)
    return image_emb.numpy(), teacher.embed_texts(tokens).numpy()


def compute_gradients(group: zarr.Group, opts: BuildOptions, scale: float) -> None:
    """Teacher gradients of the symmetric CLIP loss over seeded gradient batches of the valid rows.

    Memory: the clean-view embeddings in their stored dtype plus the fp32 gradients, 12·N·D bytes for fp16
    stores (each batch is cast to fp32 on its own)."""
    valid = group["valid"][...]
    image = group["image_emb"][:, 0] if opts.views else group["image_emb"][...]
    text = group["text_emb"][...]
    rows = np.random.default_rng(opts.seed).permutation(np.flatnonzero(valid))
    n_batches = math.ceil(len(rows) / opts.grad_batch)
    batches = np.full((n_batches, opts.grad_batch), -1, dtype=np.int64)  # -1 pads the last, shorter batch
    batches.flat[:len(rows)] = rows
    image_grad = np.zeros(image.shape, np.float32)
    text_grad = np.zeros(text.shape, np.float32)
    for batch in tqdm(batches, desc="gradients", unit="batch", leave=False):
        idx = batch[batch >= 0]
        g_img, g_txt = clip_loss_grads(torch.from_numpy(image[idx].astype(np.float32)),
                                       torch.from_numpy(text[idx].astype(np.float32)), scale)
        image_grad[idx], text_grad[idx] = g_img.numpy(), g_txt.numpy()
    if "grad_batches" in group:
        del group["grad_batches"]
    group.create_array("grad_batches", data=batches, chunks=(max(1, min(n_batches, 1024)), opts.grad_batch))
    group["image_grad"][:] = image_grad
    group["text_grad"][:] = text_grad


def build_cache(opts: BuildOptions) -> Path:
    """Build (or resume) the store at opts.out. Works as a plain process or under torchrun."""
    opts.check()
    rank, world = dist.init_distributed(opts.device)
    device = dist.local_device(opts.device)
    corpus = Corpus.open(opts.data, on_error=opts.on_error)
    teacher = create_clip(opts.teacher, opts.pretrained, device=device)
    teacher.model.eval()
    attrs = store_attrs(opts, teacher, corpus)

    decision: tuple[str, str] = ("ok", "")
    if rank == 0:
        try:
            _, state = open_or_create(opts, attrs, corpus)
            decision = ("ok", state)
        except CacheError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(decision)
    if decision[0] == "error":
        raise CacheError(decision[1])
    if decision[1] == "complete":
        log.info("store %s is already complete", opts.out)
        return Path(opts.out)

    group = zarr.open_group(opts.out, mode="r+")
    done = group["blocks_done"][...]
    todo = [int(b) for b in np.flatnonzero(~done)]
    mine = todo[rank::world]
    dataset = BlockBatches(corpus, mine, opts, teacher)
    rows_todo = sum(stop - start for start, stop in map(dataset.block_rows, mine))
    loader = DataLoader(dataset, batch_size=None, num_workers=opts.workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=4 if opts.workers else None,
                        persistent_workers=False)
    writer = BlockWriter(group, opts, teacher.embed_dim)
    errors: list[str] = []
    start_time = time.perf_counter()
    with tqdm(total=rows_todo, unit="sample", desc=f"teacher pass (rank {rank})", disable=rank != 0 and world > 1,
              dynamic_ncols=True) as bar:
        for batch in loader:
            image_emb, text_emb = encode_batch(teacher, batch)
            writer.add(batch, image_emb, text_emb)
            errors.extend(batch["errors"])
            bar.update(len(batch["rows"]))
    elapsed = time.perf_counter() - start_time
    if writer.pending:
        raise RuntimeError(f"blocks {sorted(writer.pending)} did not receive all their batches")

    all_errors = [e for part in dist.all_gather_objects(errors) for e in part]
    dist.barrier()
    if rank == 0:
        compute_gradients(group, opts, attrs["teacher_logit_scale"])
        valid = group["valid"][...]
        previous = list(group.attrs.get("invalid_examples", []))
        group.attrs.update({
            "invalid_count": int((~valid).sum()),
            "invalid_examples": sorted(set(previous + all_errors))[:100],
            "corpus_errors": corpus.errors,
            "options": {"on_error": opts.on_error, "workers": opts.workers, "device": opts.device, "world": world},
            "complete": True,
        })
        rate = rows_todo / elapsed if elapsed > 0 else float("nan")
        log.info("wrote %s: %d rows (%d this run at %.1f samples/s), %d invalid", opts.out,
                 corpus.num_samples, rows_todo, rate, int((~valid).sum()))
    dist.barrier()
    return Path(opts.out)

