"""`kd-cache build`: run the teacher once over the corpus and write its targets into a Zarr store.

Work is cut into blocks of `chunk_rows` corpus rows (one Zarr chunk each), and blocks into **windows** of
`window_blocks` blocks drawn from a seeded shuffle of all blocks. A window is the unit of work:
- its samples are decoded and embedded in fixed batches of `batch_size` rows inside each block (the same batches
  whatever the number of ranks, so the store equals the single-process one);
- its teacher gradients are computed at once, on the teacher's device, over gradient batches drawn from a seeded
  permutation of the window's valid rows: memory per rank is one window, not the corpus, and no rank waits for
  a serial gradient phase;
- its data is written before its blocks' `blocks_done` markers, so a killed build redoes at most the windows in
  flight and re-running the same command gives a store bit-identical to an uninterrupted build;
- torchrun ranks take disjoint windows, i.e. disjoint chunk files: no write races, on disk or object storage.
Gradients are computed from the stored (dtype-rounded) embeddings, so stage two can recompute them exactly.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from common import dist
from common.cache import (CAPTIONS, CHUNK_ROWS, COMPLETE_KEYS, DTYPES, FORMAT_VERSION, MAIN_TEACHER, TEACHER_ATTRS,
                          TEACHER_NAME, TEACHERS, CacheError, content_hash, create_store, create_teacher_group,
                          dequantize, grad_slots, open_group, provenance_diff, quantize, read_chunked, store_index,
                          teacher_group)
from common.contrastive import contrastive_loss_grads
from common.corpus import Corpus
from common.families import image_size
from common.models import LoadedCLIP, create_clip
from common.storage import exists, join, remove_tree
from stage1_teacher.captions import embed_captions
from common.views import CLEAN_VIEW, DEFAULT_SCALE, keyed_view, render, views_to_arrays

log = logging.getLogger("kd-cache")
WINDOW_ROWS = 8192  # default rows per gradient window (rounded up to whole blocks)


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
    grads: bool = True
    window_blocks: int = 0  # 0: enough blocks for WINDOW_ROWS rows and at least one gradient batch
    name: str = MAIN_TEACHER  # another name: add this teacher to the existing store at `out` (teachers/<name>/)

    def check(self) -> None:
        for name in ("batch_size", "grad_batch", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.grad_batch < 2:
            raise ValueError("--grad-batch must be >= 2: a contrastive loss needs negatives")
        if self.views < 0:
            raise ValueError(f"--views must be >= 0, got {self.views}")
        if self.window_blocks < 0:
            raise ValueError(f"--window-blocks must be >= 0, got {self.window_blocks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed}: give a whole number from 0 to 2**63 - 1")

    @property
    def adds_teacher(self) -> bool:
        return self.name != MAIN_TEACHER

    def inherit(self, build: dict, options: dict) -> "BuildOptions":
        """An added teacher sees the rows, views and gradient batches of the store's build: its options."""
        return replace(self, batch_size=build["batch_size"], grad_batch=build["grad_batch"], views=build["views"],
                       dtype=build["dtype"], seed=build["seed"], chunk_rows=build["chunk_rows"],
                       view_scale=tuple(build["view_scale"]), grads=build["grads"],
                       window_blocks=build["window_blocks"], on_error=options.get("on_error", self.on_error))

    @property
    def blocks_per_window(self) -> int:
        return self.window_blocks or max(1, math.ceil(max(WINDOW_ROWS, self.grad_batch) / self.chunk_rows))


def store_attrs(opts: BuildOptions, teacher: LoadedCLIP, corpus: Corpus) -> dict:
    """Everything that determines the store's content, compared on resume and by stage two."""
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher.provenance(),
        "corpus": corpus.description(),
        "build": {
            "dtype": opts.dtype, "views": opts.views, "seed": opts.seed, "grad_batch": opts.grad_batch,
            "batch_size": opts.batch_size, "chunk_rows": opts.chunk_rows, "view_scale": list(opts.view_scale),
            "caption": "first line of <key>.txt", "grads": opts.grads, "window_blocks": opts.blocks_per_window,
        },
        "embed_dim": teacher.embed_dim,
        "teacher_logit_scale": teacher.logit_scale,
        "teacher_logit_bias": teacher.logit_bias,
        "grad_scale": opts.grad_batch / teacher.logit_scale if opts.grads else None,
    }


def check_fits_in_memory(opts: BuildOptions, teacher: LoadedCLIP, num_rows: int) -> None:
    """Refuse, before a store is made, options whose buffers this machine cannot hold (the build would fail to
    allocate them, or swap): per rank, a window's embeddings (float32, stored and gradient copies), its
    gradient-batch chunk (int64 per nominal window row) and the rendered image batches in flight."""
    views, dim = 1 + opts.views, teacher.embed_dim
    pixels = math.prod(image_size(teacher.model))
    window_rows = opts.blocks_per_window * opts.chunk_rows
    held_rows = min(window_rows, num_rows)
    batches_in_flight = opts.workers * 4 + 1  # the loader's prefetch_factor per worker, and the one being encoded
    need = {"window": held_rows * (views + 1) * dim * 4 * 3 + (window_rows * 8 if opts.grads else 0),
            "image batches": batches_in_flight * min(opts.batch_size, num_rows) * views * 3 * pixels * 4}
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
    if sum(need.values()) > memory:
        parts = ", ".join(f"{what} {n / 2**30:.1f} GiB" for what, n in need.items())
        raise ValueError(f"a window of {window_rows} rows (--chunk-rows {opts.chunk_rows} x --window-blocks "
                         f"{opts.blocks_per_window}), --views {opts.views}, --batch-size {opts.batch_size} and "
                         f"--workers {opts.workers}: a build needs at least {sum(need.values()) / 2**30:.1f} GiB per "
                         f"rank ({parts}), more than this machine's {memory / 2**30:.1f} GiB per rank: lower them")


def window_blocks(n_blocks: int, per_window: int, seed: int) -> list[np.ndarray]:
    """The blocks of each window: consecutive groups of a seeded shuffle of all blocks (sorted inside a window,
    for read locality). Gradient batches mix rows from anywhere in the corpus, not one shard's stretch."""
    order = np.random.default_rng([seed, 0x6B64]).permutation(n_blocks)
    return [np.sort(order[i:i + per_window]) for i in range(0, n_blocks, per_window)]


def window_grad_batches(rows: np.ndarray, valid: np.ndarray, grad_batch: int, slots: int, seed: int,
                        window: int) -> np.ndarray:
    """(slots, grad_batch) rows of a window's gradient batches: a seeded permutation of its valid rows, cut in
    order; the last, shorter batch and unused slots are padded with -1."""
    chosen = np.random.default_rng([seed, window]).permutation(rows[valid])
    batches = np.full((slots, grad_batch), -1, dtype=np.int64)
    batches.flat[:len(chosen)] = chosen
    return batches


class BlockBatches(IterableDataset):
    """DataLoader side: decodes blocks' samples and renders every view for the teacher, batch by batch."""

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
                size = min(self.opts.batch_size, stop - start - number * self.opts.batch_size)
                yield self.collate(block, n_batches, [next(samples) for _ in range(size)])

    def views(self, key: str) -> list:
        return [CLEAN_VIEW] + [keyed_view(self.opts.seed, key, v, scale=self.opts.view_scale)
                               for v in range(1, self.opts.views + 1)]

    def collate(self, block: int, n_batches: int, samples) -> dict:
        views = [self.views(s.key) for s in samples]
        ok = [(s, v) for s, v in zip(samples, views) if s.error is None]
        images = torch.stack([torch.stack([render(s.image, view, self.preprocess) for view in vs]) for s, vs in ok]) \
            if ok else torch.empty(0)
        boxes, flips = views_to_arrays([vs[1:] for vs in views])
        return {
            "block": block, "n_batches": n_batches,
            "rows": np.array([s.row for s in samples]),
            "valid": np.array([s.error is None for s in samples]),
            "digests": np.array([s.digest for s in samples], dtype=np.uint32),
            "boxes": boxes, "flips": flips,
            "images": images,
            "tokens": self.tokenizer([s.caption for s, _ in ok]) if ok else torch.empty(0, dtype=torch.long),
            "errors": [f"{s.shard}/{s.key}: {s.error}" for s in samples if s.error],
        }


class WindowWriter:
    """Main-process side: gathers each window's batches (they arrive interleaved across workers), and once a window
    is whole computes its gradients and writes it: the teacher's arrays into `group`, and the arrays all teachers
    share (valid flags, views, gradient batches) into `root` (the build), or checks them against it (an added
    teacher must see the same rows)."""

    def __init__(self, root: zarr.Group, group: zarr.Group, opts: BuildOptions, embed_dim: int, scale: float,
                 bias: float | None, grad_scale: float | None, windows: dict[int, np.ndarray], device: str):
        self.root, self.group, self.opts, self.embed_dim, self.device = root, group, opts, embed_dim, device
        self.scale, self.bias, self.grad_scale = scale, bias, grad_scale
        self.window_of = {int(b): w for w, blocks in windows.items() for b in blocks}
        self.windows = windows
        self.blocks: dict[int, dict] = {}
        self.blocks_complete: dict[int, int] = {}
        self.num_rows = root["valid"].shape[0]
        self.slots = grad_slots(opts.blocks_per_window * opts.chunk_rows, opts.grad_batch)

    @property
    def pending(self) -> list[int]:
        return sorted(self.blocks)

    def add(self, batch: dict, image_emb: np.ndarray | None, text_emb: np.ndarray | None) -> None:
        block = batch["block"]
        start = block * self.opts.chunk_rows
        if block not in self.blocks:
            n = min(self.opts.chunk_rows, self.num_rows - start)
            self.blocks[block] = {
                "image": np.zeros((n, 1 + self.opts.views, self.embed_dim), np.float32),
                "text": np.zeros((n, self.embed_dim), np.float32), "valid": np.zeros(n, bool),
                "digests": np.zeros(n, np.uint32),
                "boxes": np.zeros((n, self.opts.views, 4)), "flips": np.zeros((n, self.opts.views), bool),
                "seen": 0, "n_batches": batch["n_batches"],
            }
        buf = self.blocks[block]
        local = batch["rows"] - start
        if batch["valid"].any():
            buf["image"][local[batch["valid"]]] = image_emb
            buf["text"][local[batch["valid"]]] = text_emb
        buf["valid"][local] = batch["valid"]
        buf["digests"][local] = batch["digests"]
        buf["boxes"][local], buf["flips"][local] = batch["boxes"], batch["flips"]
        buf["seen"] += 1
        if buf["seen"] < buf["n_batches"]:
            return
        window = self.window_of[block]
        self.blocks_complete[window] = self.blocks_complete.get(window, 0) + 1
        if self.blocks_complete[window] == len(self.windows[window]):
            del self.blocks_complete[window]
            self.write(window, [self.blocks.pop(int(b)) for b in self.windows[window]])

    def write(self, window: int, bufs: list[dict]) -> None:
        blocks = self.windows[window]
        dtype = self.opts.dtype
        stored_image = [quantize(b["image"], dtype) for b in bufs]
        stored_text = [quantize(b["text"], dtype) for b in bufs]
        g = self.group
        grads = self.gradients(window, blocks, bufs, stored_image, stored_text) if self.opts.grads else None
        for i, (block, buf) in enumerate(zip(blocks, bufs)):
            start = int(block) * self.opts.chunk_rows
            stop = start + len(buf["valid"])
            g["image_emb"][start:stop] = stored_image[i] if self.opts.views else stored_image[i][:, 0]
            g["text_emb"][start:stop] = stored_text[i]
            self.shared("valid", slice(start, stop), buf["valid"])
            if "sample_crc32c" in self.root:  # an added teacher of a store older than sample digests has none
                self.shared("sample_crc32c", slice(start, stop), buf["digests"])
            if self.opts.views:
                self.shared("view_boxes", slice(start, stop), buf["boxes"])
                self.shared("view_flips", slice(start, stop), buf["flips"])
            if grads is not None:
                g["image_grad"][start:stop], g["text_grad"][start:stop] = grads[0][i], grads[1][i]
        for block in blocks:  # last: a block is done only once its window's data is on disk
            g["blocks_done"][int(block)] = True

    def shared(self, name: str, where: slice, values: np.ndarray) -> None:
        """Write an array all teachers share (the build), or check that an added teacher saw the same."""
        if not self.opts.adds_teacher:
            self.root[name][where] = values
        elif not np.array_equal(self.root[name][where], values):
            raise CacheError(f"rows {where.start}..{where.stop - 1}: {name} differs from the store's build (the "
                             f"shards or their readability changed since): rebuild the store for this data")

    def gradients(self, window: int, blocks, bufs, stored_image, stored_text):
        """Teacher gradients of its own loss (softmax CLIP, or sigmoid with a logit bias) over the window's gradient batches, from the stored values,
        written as g * grad_scale in fp16 (O(1) values). Also writes the window's chunk of `grad_batches`."""
        rows = np.concatenate([int(b) * self.opts.chunk_rows + np.arange(len(buf["valid"]))
                               for b, buf in zip(blocks, bufs)])
        valid = np.concatenate([buf["valid"] for buf in bufs])
        batches = window_grad_batches(rows, valid, self.opts.grad_batch, self.slots, self.opts.seed, window)
        image = torch.from_numpy(dequantize(np.concatenate(stored_image)[:, 0])).to(self.device)
        text = torch.from_numpy(dequantize(np.concatenate(stored_text))).to(self.device)
        image_grad, text_grad = torch.zeros_like(image), torch.zeros_like(text)
        for batch in batches:  # rows ascend (sorted blocks), so a row's position is a binary search away
            idx = torch.from_numpy(np.searchsorted(rows, batch[batch >= 0])).to(self.device)
            if len(idx):
                image_grad[idx], text_grad[idx] = contrastive_loss_grads(image[idx], text[idx], self.scale,
                                                                              self.bias)
        self.shared("grad_batches", slice(window * self.slots, (window + 1) * self.slots), batches)
        cut = np.cumsum([len(buf["valid"]) for buf in bufs])[:-1]
        to_stored = lambda g: np.split((g * self.grad_scale).cpu().numpy().astype(np.float16), cut)  # noqa: E731
        return to_stored(image_grad), to_stored(text_grad)


def open_or_create(opts: BuildOptions, attrs: dict, corpus: Corpus) -> str:
    """Rank 0: resume a matching store, refuse a different one, or create it. Returns the state."""
    out = opts.out
    if opts.overwrite:
        remove_tree(out)
    if exists(out) and not exists(join(out, "zarr.json")):
        raise CacheError(f"--out {out} exists and is not a Zarr store: choose another path or remove it")
    if exists(out):
        stored = dict(open_group(out, mode="r+").attrs)
        if stored.get("initialized"):
            diffs = provenance_diff(stored, attrs)
            if diffs:
                raise CacheError(f"store {out} was built differently:\n  " + "\n  ".join(diffs) +
                                 "\nUse another --out, the original options, or --overwrite to replace it.")
            return "complete" if stored.get("complete") else "resume"
        remove_tree(out)  # killed while being created: nothing of value in it
    group = create_store(out, attrs, corpus.index)
    group.attrs["initialized"] = True
    return "new"


def open_or_add_teacher(opts: BuildOptions, attrs: dict) -> str:
    """Rank 0: resume or create teachers/<name>/ in a finished store of the same data; refuse a teacher the store
    already holds, a name taken by another teacher, or a store of other data. Returns the state."""
    out, name = opts.out, opts.name
    if not TEACHER_NAME.match(name) or name == MAIN_TEACHER:
        raise CacheError(f"--name {name!r}: give a name of letters, digits, '-' or '_' (starting with a letter), "
                         f"other than {MAIN_TEACHER!r} (the build's teacher)")
    root = open_group(out, mode="r+")
    stored = dict(root.attrs)
    if stored.get("format_version") != FORMAT_VERSION or not stored.get("complete"):
        raise CacheError(f"store {out} is not a finished format-{FORMAT_VERSION} store: finish (or rebuild) it with "
                         f"`kd-cache build` before adding teachers")
    diffs = provenance_diff(stored, attrs, keys=("corpus",))
    if diffs:
        raise CacheError(f"store {out} was built from other data than --data {opts.data}:\n  " + "\n  ".join(diffs))
    added = dict(root[TEACHERS].groups()) if TEACHERS in root else {}
    holders = {MAIN_TEACHER: stored["teacher"]} | {n: dict(g.attrs).get("teacher") for n, g in added.items()}
    for holder, teacher in holders.items():
        same = teacher and teacher["fingerprint"] == attrs["teacher"]["fingerprint"] and \
            teacher["config"] == attrs["teacher"]["config"]
        if same and holder != name:
            raise CacheError(f"store {out} already holds this teacher ({attrs['teacher']['model']}, weights "
                             f"{attrs['teacher']['fingerprint'][:12]}) as {holder!r}")
    if name in added:
        group = added[name]
        if group.attrs.get("initialized"):
            diffs = provenance_diff(dict(group.attrs), attrs, keys=("teacher",))
            if diffs:
                raise CacheError(f"store {out} has another teacher named {name!r}:\n  " + "\n  ".join(diffs) +
                                 "\nChoose another --name.")
            return "complete" if group.attrs.get("complete") else "resume"
        remove_tree(join(out, TEACHERS, name))  # killed while being created
    group = create_teacher_group(root, name, {k: attrs[k] for k in TEACHER_ATTRS})
    group.attrs["initialized"] = True
    return "new"


def encode_batch(teacher: LoadedCLIP, batch: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    images, tokens = batch["images"], batch["tokens"]
    if not len(tokens):
        return None, None
    n, v = images.shape[:2]
    image_emb = teacher.embed_images(images.flatten(0, 1)).view(n, v, -1)
    return image_emb.numpy(), teacher.embed_texts(tokens).numpy()


def build_cache(opts: BuildOptions) -> str:
    """Build (or resume) the store at opts.out. Works as a plain process or under torchrun."""
    opts.check()
    rank, world = dist.init_distributed(opts.device)
    device = dist.local_device(opts.device)
    known = store_index(opts.out) if not opts.overwrite else None  # resume: no shard is scanned again
    if opts.adds_teacher:
        if known is None:
            raise CacheError(f"{opts.out} is not a cache store: build it with `kd-cache build` first")
        stored = dict(open_group(opts.out).attrs)
        opts = opts.inherit(stored["build"], stored.get("options", {}))
    corpus = Corpus.open(opts.data, on_error=opts.on_error, known=[known] if known else [])
    teacher = create_clip(opts.teacher, opts.pretrained, device=device)
    check_fits_in_memory(opts, teacher, corpus.num_samples)
    attrs = store_attrs(opts, teacher, corpus)

    decision: tuple[str, str] = ("ok", "")
    if rank == 0:
        try:
            decision = ("ok", open_or_add_teacher(opts, attrs) if opts.adds_teacher
                        else open_or_create(opts, attrs, corpus))
        except CacheError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(decision)
    if decision[0] == "error":
        raise CacheError(decision[1])
    if decision[1] == "complete":
        log.info("store %s: teacher %s is already complete", opts.out, opts.name)
        return opts.out

    root, group = zarr.open_group(opts.out, mode="r+"), teacher_group(opts.out, opts.name)
    done = read_chunked(group["blocks_done"], 0, group["blocks_done"].shape[0], f"cache {opts.out}")
    windows = window_blocks(len(done), opts.blocks_per_window, opts.seed)
    todo = [w for w, blocks in enumerate(windows) if not done[blocks].all()]
    mine = {w: windows[w] for w in todo[rank::world]}
    dataset = BlockBatches(corpus, [int(b) for w in mine for b in mine[w]], opts, teacher)
    rows_todo = sum(stop - start for start, stop in map(dataset.block_rows, dataset.blocks))
    loader = DataLoader(dataset, batch_size=None, num_workers=opts.workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=4 if opts.workers else None,
                        persistent_workers=False, worker_init_fn=dist.worker_dies_with_parent())
    writer = WindowWriter(root, group, opts, teacher.embed_dim, attrs["teacher_logit_scale"],
                          attrs["teacher_logit_bias"], attrs["grad_scale"],
                          mine, device)
    errors: list[str] = []
    start_time = time.perf_counter()
    with tqdm(total=rows_todo, unit="sample", desc=f"teacher {opts.name} (rank {rank})",
              disable=rank != 0 and world > 1, dynamic_ncols=True) as bar:
        for batch in loader:
            writer.add(batch, *encode_batch(teacher, batch))
            errors.extend(batch["errors"])
            bar.update(len(batch["rows"]))
    elapsed = time.perf_counter() - start_time
    if writer.pending:
        raise RuntimeError(f"blocks {writer.pending} did not receive all their batches")
    if opts.adds_teacher:
        if root.get(CAPTIONS) is not None and root[CAPTIONS].attrs.get("complete"):
            embed_captions(opts.out, group, teacher, rank, world)
        rows_done = sum(dist.all_gather_objects(rows_todo))  # also waits for every rank's writes
        if rank == 0:
            group.attrs["complete"] = True
            log.info("added teacher %s (%s) to %s: %d rows this run, %.1f s", opts.name, teacher.name, opts.out,
                     rows_done, elapsed)
        dist.barrier()
        return opts.out

    all_errors = [e for part in dist.all_gather_objects(errors) for e in part]
    rows_done = sum(dist.all_gather_objects(rows_todo))
    if rank == 0:
        valid = group["valid"][...]
        previous = list(group.attrs.get("invalid_examples", []))
        finished = {
            "invalid_count": int((~valid).sum()),
            "invalid_examples": sorted(set(previous + all_errors))[:100],
            "corpus_errors": corpus.errors,
            "options": {"on_error": opts.on_error, "workers": opts.workers, "device": opts.device, "world": world},
            "complete": True,
        }
        # one update: a store is never complete without the hash that seals what it finished with
        group.attrs.update(finished | {"complete_hash": content_hash(dict(group.attrs) | finished, COMPLETE_KEYS)})
        rate = rows_todo / elapsed if elapsed > 0 else float("nan")
        log.info("wrote %s: %d rows (%d this run, %.1f samples/s on rank 0, %d ranks), %d invalid, %.1f s%s",
                 opts.out, corpus.num_samples, rows_done, rate, world, int((~valid).sum()), elapsed,
                 f"; {len(corpus.lost)} damaged shard(s) lost their samples after the damage (corpus_errors)"
                 if corpus.lost else "")
    dist.barrier()
    return opts.out
