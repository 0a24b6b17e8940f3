"""The teacher cache: a Zarr v3 group, readable with plain `zarr.open` + numpy. Format: docs/cache-format.md.

Row i of every per-sample array belongs to corpus row i (shard order, then order in the shard; see corpus.py).
Arrays are chunked along the sample axis only; `CHUNK_ROWS` was chosen with bench/bench_cache_chunks.py.
"""
from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zarr

from common.corpus import Corpus

FORMAT_VERSION = 1
CHUNK_ROWS = 2048
DTYPES = {"fp16": "float16", "fp32": "float32"}
GRAD_DTYPE = "float32"  # gradients are O(scale / B): fp16 would flush many to subnormals
# Provenance sections that must match for a store to be resumed or used with given data / teacher.
PROVENANCE_KEYS = ("format_version", "teacher", "corpus", "build")


class CacheError(ValueError):
    """A store that is missing, incomplete, or does not fit the data / teacher / options it is used with."""


def provenance_diff(stored: dict, wanted: dict, keys=PROVENANCE_KEYS) -> list[str]:
    """Human-readable differences between two attrs dicts, section by section ('teacher.fingerprint: a != b')."""
    diffs: list[str] = []

    def walk(prefix: str, a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(f"{prefix}.{k}" if prefix else k, a.get(k), b.get(k))
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            show = lambda v: (json.dumps(v)[:80] + "...") if len(json.dumps(v)) > 80 else json.dumps(v)  # noqa: E731
            diffs.append(f"{prefix}: store has {show(a)}, now {show(b)}")

    for key in keys:
        walk(key, stored.get(key), wanted.get(key))
    return diffs


def create_store(path: str | Path, attrs: dict, num_rows: int, embed_dim: int, views: int, dtype: str,
                 chunk_rows: int, num_shards: int) -> zarr.Group:
    """Create an empty store with every array (the data is filled in by the build)."""
    group = zarr.open_group(str(path), mode="w")
    emb_shape = (num_rows, 1 + views, embed_dim) if views else (num_rows, embed_dim)
    per_row = lambda shape: (chunk_rows,) + tuple(shape[1:])  # noqa: E731
    arrays = {
        "image_emb": (emb_shape, DTYPES[dtype]),
        "text_emb": ((num_rows, embed_dim), DTYPES[dtype]),
        "image_grad": ((num_rows, embed_dim), GRAD_DTYPE),
        "text_grad": ((num_rows, embed_dim), GRAD_DTYPE),
        "valid": ((num_rows,), "bool"),
        "keys": ((num_rows,), str),
    }
    if views:
        arrays["view_boxes"] = ((num_rows, views, 4), "float64")
        arrays["view_flips"] = ((num_rows, views), "bool")
    for name, (shape, dt) in arrays.items():
        group.create_array(name, shape=shape, chunks=per_row(shape), dtype=dt, compressors=None,
                           fill_value="" if dt is str else 0)
    for name, dt in (("shard_names", str), ("shard_first_row", "int64"), ("shard_count", "int64"),
                     ("shard_size", "int64")):
        group.create_array(name, shape=(num_shards,), chunks=(max(num_shards, 1),), dtype=dt,
                           fill_value="" if dt is str else 0)
    # one chunk per block, so ranks mark their own blocks without touching each other's chunk files
    n_blocks = -(-num_rows // chunk_rows)
    group.create_array("blocks_done", shape=(n_blocks,), chunks=(1,), dtype="bool", fill_value=False)
    group.attrs.update({**attrs, "complete": False})
    return group


def remove_store(path: str | Path) -> None:
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)


class CacheStore:
    """Read side of a finished store, for stage two and evaluation."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise CacheError(f"cache {self.path} is not a Zarr store (no zarr.json): build it with `kd-cache build`")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"cache {self.path} has format version {self.attrs.get('format_version')}, "
                             f"this package reads {FORMAT_VERSION}: rebuild it with `kd-cache build --overwrite`")
        if not self.attrs.get("complete"):
            raise CacheError(f"cache {self.path} is incomplete (an interrupted build): re-run the same "
                             f"`kd-cache build` command to finish it")

    @property
    def num_rows(self) -> int:
        return int(self.group["valid"].shape[0])

    @property
    def views(self) -> int:
        return int(self.attrs["build"]["views"])

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def teacher_logit_scale(self) -> float:
        return float(self.attrs["teacher_logit_scale"])

    def has(self, name: str) -> bool:
        return name in self.group

    def nbytes(self, name: str) -> int:
        """Bytes the array takes in memory, without reading it."""
        array = self.group[name]
        return int(np.prod(array.shape)) * array.dtype.itemsize

    def require(self, names, why: str = "") -> None:
        missing = [n for n in names if n not in self.group]
        if missing:
            raise CacheError(f"cache {self.path} lacks array(s) {missing}{' needed by ' + why if why else ''}: "
                             f"rebuild it with a current `kd-cache build`")

    def load(self, name: str) -> np.ndarray:
        """A whole array in memory (zarr reads its chunks in parallel; never row by row)."""
        self.require([name])
        data = self.group[name][...]
        return data.astype(object).astype(str) if data.dtype.kind == "T" else data  # StringDType -> fixed str


def join_to_cache(corpus: Corpus, cache: CacheStore) -> np.ndarray:
    """Cache row of every corpus row, by shard identity (name, size, count) and key; refuses other data."""
    shards = cache.load("shard_names")
    first = cache.load("shard_first_row")
    counts, sizes = cache.load("shard_count"), cache.load("shard_size")
    where = {str(name): i for i, name in enumerate(shards)}
    keys = cache.load("keys")
    rows = np.empty(corpus.num_samples, dtype=np.int64)
    for shard, start in zip(corpus.shards, corpus.first_rows):
        i = where.get(shard.name)
        if i is None:
            raise CacheError(f"shard {shard.path} is not in cache {cache.path} (built from "
                             f"{len(shards)} shards {shards[0]}..{shards[-1]}): build a cache for this data")
        if counts[i] != len(shard.keys) or sizes[i] != shard.size:
            raise CacheError(f"shard {shard.path} differs from the one cache {cache.path} was built from "
                             f"({len(shard.keys)} samples / {shard.size} bytes, cache has {counts[i]} / {sizes[i]}): "
                             f"rebuild the cache")
        span = np.arange(first[i], first[i] + counts[i])
        if not np.array_equal(keys[span].astype(str), np.array(shard.keys, dtype=str)):
            raise CacheError(f"shard {shard.path}: keys differ from cache {cache.path}: rebuild the cache")
        rows[start:start + len(shard.keys)] = span
    return rows


class ChunkedRows:
    """Rows of a Zarr array too big for memory, read chunk-aware: a request reads the whole chunks that hold its
    rows (one read each, never row by row) and keeps the last `max_chunks` of them, so shuffled batches drawn from
    a window of nearby rows (shard order + shuffle buffer) mostly hit chunks already in memory.
    Same call as numpy's `array.take(rows, axis=0)`, so in-memory and chunked targets are used alike."""

    def __init__(self, array: zarr.Array, max_chunks: int):
        self.array, self.max_chunks = array, max(1, max_chunks)
        self.chunk_rows = array.chunks[0]
        self.chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.chunk_reads = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def nbytes(self) -> int:
        """Bytes the chunk LRU may hold."""
        per_row = int(np.prod(self.array.shape[1:])) * self.array.dtype.itemsize
        return self.max_chunks * self.chunk_rows * per_row

    def _chunk(self, number: int) -> np.ndarray:
        if number in self.chunks:
            self.chunks.move_to_end(number)
        else:
            start = number * self.chunk_rows
            self.chunks[number] = self.array[start:start + self.chunk_rows]
            self.chunk_reads += 1
            if len(self.chunks) > self.max_chunks:
                self.chunks.popitem(last=False)
        return self.chunks[number]

    def take(self, rows: np.ndarray, axis: int = 0) -> np.ndarray:
        if axis != 0:
            raise ValueError("ChunkedRows.take reads along the sample axis only")
        rows = np.asarray(rows)
        out = np.empty((len(rows),) + tuple(self.array.shape[1:]), dtype=self.array.dtype)
        chunk_of = rows // self.chunk_rows
        for number in np.unique(chunk_of):
            mask = chunk_of == number
            out[mask] = self._chunk(int(number))[rows[mask] - number * self.chunk_rows]
        return out

