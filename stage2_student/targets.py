"""Teacher targets per batch: from the cache when it holds them for the view the student saw, otherwise from the
live teacher (loaded once from the cache's provenance), batch by batch.

The memory budget is a node's. Cached arrays that fit it are held whole (as stored: N x (1+K) x D x 2 bytes for fp16
image embeddings, N x D x 2 for text, N x D x 2 per gradient array): in memory for a single process, and as a memory
map of one node-local copy shared by all ranks of a node under torchrun; rows are gathered by numpy indexing and the
hot path never touches Zarr. Above the budget each rank reads them chunk-aware (`ChunkedRows`: whole chunks, kept in
an LRU of its share of the budget). `TargetProvider.memory_bytes`, `.chunked` and `.node_local` say which and
how much.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import google_crc32c
import numpy as np
import torch

from common import dist
from common.cache import MAIN_TEACHER, CacheError, CacheStore, ChunkedRows, read_chunked
from common.storage import cache_dir
from common.defaults import MODES
from common.models import LoadedCLIP
from common.families import forward_features
from stage2_student.losses import CACHEABLE_TARGETS, TeacherTargets

log = logging.getLogger("kd-train")
_LIVE_FEATURE = {"image_emb": "image_emb", "text_emb": "text_emb", "image_tokens": "image_tokens",
                 "hidden_states": "hidden_states", "attentions": "attentions"}


def uncacheable(needs: frozenset[str]) -> frozenset[str]:
    return needs - CACHEABLE_TARGETS


def node_local_copy(cache: CacheStore, name: str) -> np.ndarray:
    """A cached array as a read-only memory map of a copy on this node's disk ($KD_CACHE_DIR/targets), written once
    per node by local rank 0 (chunk by chunk, the store's checksums verified) and kept for later runs: every rank
    of the node reads the same pages, so the node holds one copy of the targets, not one per rank. The copy's
    blocks have CRC32C checksums beside it (`<copy>.crc32c.json`): local rank 0 checks them at every open, and a
    damaged, truncated or unchecked copy is rebuilt from the store, with a warning."""
    path = cache_dir() / "targets" / f"{cache.attrs['content_hash'][:32]}-{name}.npy"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        array = cache.array(name)
        damage = copy_damage(path, array) if path.exists() else None
        if damage:
            log.warning("node-local target copy %s %s: rebuilding it from the store %s", path, damage, cache.path)
        if damage or not path.exists():
            write_copy(path, array, f"cache {cache.path}")
    dist.barrier()
    return np.load(path, mmap_mode="r")


def checksums_path(copy: Path) -> Path:
    return copy.with_name(f"{copy.stem}.crc32c.json")


def block_checksums(values: np.ndarray, rows: int) -> list[int]:
    return [google_crc32c.value(np.ascontiguousarray(values[start:start + rows]))
            for start in range(0, len(values), rows)]


def write_copy(path: Path, array, what: str) -> None:
    """The copy and its per-block checksums, each written to a temporary file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    copy = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
    rows = array.chunks[0]
    sums = []
    for start in range(0, array.shape[0], rows):
        block = read_chunked(array, start, start + rows, what)
        copy[start:start + rows] = block
        sums.extend(block_checksums(block, rows))
    copy.flush()
    del copy
    sums_tmp = tmp.with_suffix(".json")
    sums_tmp.write_text(json.dumps({"rows_per_block": rows, "crc32c": sums}))
    os.replace(sums_tmp, checksums_path(path))
    os.replace(tmp, path)


def copy_damage(path: Path, array) -> str | None:
    """What is wrong with the copy at `path` of the store's `array` (None: its every block matches its checksum)."""
    try:
        recorded = json.loads(checksums_path(path).read_text())
        rows, sums = int(recorded["rows_per_block"]), list(recorded["crc32c"])
    except FileNotFoundError:
        return "has no checksums (written by an older version)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"has unreadable checksums ({checksums_path(path).name}: {e})"
    try:
        copy = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # a truncated file: 'mmap length is greater than file size'
        return f"cannot be read ({e})"
    if copy.shape != array.shape or copy.dtype != array.dtype or path.stat().st_size != copy.offset + copy.nbytes:
        return (f"holds {copy.shape} {copy.dtype} in {path.stat().st_size} bytes, not the store's "
                f"{array.shape} {array.dtype}")
    blocks = -(-len(copy) // rows)
    if len(sums) != blocks:
        return f"has checksums for {len(sums)} blocks, not its {blocks}"
    bad = [i for i, (found, stored) in enumerate(zip(block_checksums(copy, rows), sums)) if found != stored]
    if bad:
        return (f"is damaged: {len(bad)} of its {blocks} blocks fail their checksums (the first: rows "
                f"{bad[0] * rows}..{min((bad[0] + 1) * rows, len(copy)) - 1})")
    return None

class TargetProvider:
    """One teacher's targets (`name`: its name in the store; `cache`: the store seen from that teacher)."""

    def __init__(self, mode: str, needs: frozenset[str], optional: frozenset[str], cache: CacheStore | None,
                 teacher: LoadedCLIP | None, grad_batches: bool, memory_budget: int | None = None,
                 name: str = MAIN_TEACHER, captions: bool = False):
        if mode not in MODES:
            raise ValueError(f"--teacher-targets {mode!r}: choose one of {MODES}")
        self.mode, self.needs, self.teacher, self.cache, self.name = mode, needs, teacher, cache, name
        self.cache_hits = self.live_batches = 0
        self.arrays: dict[str, np.ndarray | ChunkedRows] = {}
        self.chunked = False
        self.node_local = False  # held whole as a memory map of the node-local copy (under torchrun)
        self.logit_scale = cache.teacher_logit_scale if cache is not None else (
            teacher.logit_scale if teacher is not None else None)
        self.logit_bias = cache.teacher_logit_bias if cache is not None else (
            teacher.logit_bias if teacher is not None else None)
        # gradients are stored scaled by grad_scale (a store built with --no-grads has none)
        self.grad_scale = float(cache.attrs.get("grad_scale") or 1.0) if cache is not None else 1.0
        if cache is not None and mode != "live":
            wanted = (needs | (optional if grad_batches else frozenset())) & {
                "image_emb", "text_emb", "image_grad", "text_grad"}
            if captions and "text_emb" in wanted:  # text targets of the synthetic captions shown
                wanted |= {"caption_text_emb"}
            cache.require(sorted(wanted), why=f"the chosen losses ({', '.join(sorted(needs))})")
            total = sum(cache.nbytes(name) for name in wanted)
            self.chunked = memory_budget is not None and total > memory_budget
            if self.chunked:  # split the rank's share of the budget across the arrays, in whole chunks
                chunks = max(1, cache.attrs["build"]["chunk_rows"])
                mine = memory_budget // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                share = lambda name: mine * cache.nbytes(name) // total  # noqa: E731
                per_chunk = lambda name: cache.nbytes(name) * chunks // max(cache.num_rows, 1)  # noqa: E731
                self.arrays = {name: ChunkedRows(cache.array(name), share(name) // max(per_chunk(name), 1),
                                                 f"cache {cache.path}") for name in wanted}
            elif int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:  # one copy per node, shared by its ranks
                # sorted: set order differs between processes (hash seeds), and each copy ends in a barrier
                self.arrays = {name: node_local_copy(cache, name) for name in sorted(wanted)}
                self.node_local = True
            else:
                self.arrays = {name: cache.load(name) for name in wanted}

    @property
    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    # ---------------------------------------------------------------- in the DataLoader worker
    def lookup(self, rows: np.ndarray, views: np.ndarray, captions: np.ndarray, grads: bool
               ) -> dict[str, np.ndarray] | None:
        """The cached pooled targets of a global micro-batch, as stored (fp16 / int8 embeddings, scaled gradients):
        `rows` its cache rows, `views` the stored view each sample is shown, `captions` its synthetic caption (-1:
        its own). None when the cache cannot serve it (live mode, nothing cached, a view the cache does not
        store). Gradients only for the build's own batches (`grads`) of clean views and own captions; otherwise
        GD recomputes them from the embeddings, on the device, for the whole batch."""
        if not self.needs or self.mode == "live" or not self.arrays or bool((views < 0).any()):
            return None
        out = {}
        if "image_emb" in self.arrays:
            image = self.arrays["image_emb"].take(rows, axis=0)
            out["image_emb"] = image[np.arange(len(rows)), views] if image.ndim == 3 else image  # (b, 1+K, D)
        synthetic = np.flatnonzero(captions >= 0)
        if "text_emb" in self.arrays:
            text = self.arrays["text_emb"].take(rows, axis=0)
            if len(synthetic):
                stored = self.arrays["caption_text_emb"].take(rows[synthetic], axis=0)
                text[synthetic] = stored[np.arange(len(synthetic)), captions[synthetic]]
            out["text_emb"] = text
        # stored gradients are those of the clean view and the sample's own caption
        if grads and "image_grad" in self.arrays and bool((views == 0).all()) and not len(synthetic):
            out["image_grad"] = self.arrays["image_grad"].take(rows, axis=0)
            out["text_grad"] = self.arrays["text_grad"].take(rows, axis=0)
        return out

    # ---------------------------------------------------------------- on the device
    def targets(self, stored: dict[str, torch.Tensor] | None, inputs: dict | None, device: str,
                sizes: tuple[int, ...]) -> TeacherTargets:
        """One teacher's targets for a micro-batch on the device: the pooled ones of the whole global micro-batch
        (from `stored`, the worker's `lookup`, or the live teacher's forward gathered over ranks of `sizes` rows),
        the per-sample maps (live only) of this rank's rows."""
        if not self.needs:
            return TeacherTargets()
        if stored is not None and not uncacheable(self.needs):
            self.cache_hits += 1
            return TeacherTargets(logit_scale=self.logit_scale, logit_bias=self.logit_bias,
                                  **{name: self.on_device(name, value, device) for name, value in stored.items()})
        self.live_batches += 1
        targets = self._from_teacher(inputs, sizes)
        if stored is not None:  # token maps / hidden states come live; pooled targets still from the cache
            for name, value in stored.items():
                setattr(targets, name, self.on_device(name, value, device))
        return targets

    def on_device(self, name: str, stored: torch.Tensor, device: str) -> torch.Tensor:
        """float32 targets from stored rows, converted on the device (`CacheStore.to_float`'s rules)."""
        value = stored.to(device, non_blocking=True).float()
        if name.endswith("_grad"):
            return value / self.grad_scale
        if stored.dtype == torch.int8:  # re-normalised; zero rows stay zero
            return torch.nn.functional.normalize(value, dim=-1)
        return value

    def _from_teacher(self, inputs: dict | None, sizes: tuple[int, ...]) -> TeacherTargets:
        if self.teacher is None:
            raise CacheError(f"a batch needs live teacher {self.name} but none is loaded")
        if inputs is None:
            raise CacheError(f"a batch needs live teacher {self.name} but was not rendered for it")
        model = self.teacher.model
        device = next(model.parameters()).device
        wanted = frozenset(_LIVE_FEATURE[n] for n in self.needs if n in _LIVE_FEATURE)
        with torch.inference_mode(), self.teacher.autocast():
            feats = forward_features(model, inputs["images"].to(device, non_blocking=True),
                                     inputs["tokens"].to(device, non_blocking=True), wanted | {"image_emb", "text_emb"})
        # out of inference mode (a clone): the losses' backward saves these
        norm = lambda x: dist.gather_cat(torch.nn.functional.normalize(x.float(), dim=-1), sizes)  # noqa: E731
        clone = lambda x: None if x is None else [t.float().clone() for t in x]  # noqa: E731
        return TeacherTargets(
            image_emb=norm(feats["image_emb"]), text_emb=norm(feats["text_emb"]), logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            image_tokens=feats["image_tokens"].float().clone() if "image_tokens" in feats else None,
            hidden_states={k: clone(v) for k, v in feats["hidden_states"].items()} if "hidden_states" in feats else None,
            attentions={k: clone(v) for k, v in feats["attentions"].items()} if "attentions" in feats else None,
        )
