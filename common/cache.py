"""The teacher cache: a Zarr v3 group (a local directory or any fsspec URL), readable with plain `zarr.open` +
numpy. Format: docs/cache-format.md.

Row i of every per-sample array belongs to corpus row i (shard order, then order in the shard; see corpus.py).
Arrays are chunked along the sample axis only; `CHUNK_ROWS` was chosen with bench/bench_cache_chunks.py. Every
chunk carries a CRC32C checksum, every chunk of a finished store must exist, and the attributes that shape the
targets are hashed: a damaged store is an error naming the array and chunk, never data.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict

import numpy as np
import zarr

from common.corpus import Corpus, as_spec
from common.defaults import CHUNK_ROWS, DTYPES, MAIN_TEACHER  # noqa: F401  (also imported from here)
from common.index import CHECKSUM, ChunkDamage, CorpusIndex, read_index, read_rows, write_index
from common.storage import StorageError, exists, join

FORMAT_VERSION = 2
GRAD_DTYPE = "float16"  # stored as g * grad_scale (grad_scale = grad_batch / s_t): values O(1), fp16-exact to 5e-4
# Provenance sections that must match for a store to be resumed or used with given data / teacher.
PROVENANCE_KEYS = ("format_version", "teacher", "corpus", "build")
# Attributes that shape the targets: hashed into `content_hash`, checked on every open.
CONTENT_KEYS = PROVENANCE_KEYS + ("embed_dim", "teacher_logit_scale", "grad_scale")
# hashed only when set, so that stores written before they existed keep their hash (a softmax teacher has no bias)
OPTIONAL_CONTENT_KEYS = ("teacher_logit_bias",)
# ... and with what the finished build adds: hashed into `complete_hash` when it finishes (older stores have none)
COMPLETE_KEYS = CONTENT_KEYS + ("invalid_count", "invalid_examples", "corpus_errors", "complete")
# Several teachers share the rows, views and gradient batches: the build's teacher ("main") has its arrays at the
# root, each teacher added later (`kd-cache add-teacher`) the same arrays under teachers/<name>/, with its own
# attributes overriding the root's TEACHER_ATTRS.
TEACHERS = "teachers"
TEACHER_ARRAYS = frozenset({"image_emb", "text_emb", "image_grad", "text_grad", "caption_text_emb", "blocks_done"})
TEACHER_ATTRS = ("teacher", "embed_dim", "teacher_logit_scale", "teacher_logit_bias", "grad_scale")
TEACHER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
CAPTIONS = "captions"  # synthetic captions: captions/text (N, C) strings; teachers' embeddings in caption_text_emb


class CacheError(ValueError):
    """A store that is missing, incomplete, damaged, or does not fit the data / teacher / options it is used with."""


def content_hash(attrs: dict, keys: tuple[str, ...] = CONTENT_KEYS) -> str:
    content = {k: attrs.get(k) for k in keys} | {
        k: attrs[k] for k in OPTIONAL_CONTENT_KEYS if attrs.get(k) is not None}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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


def grad_slots(window_rows: int, grad_batch: int) -> int:
    """Gradient batches a window of `window_rows` rows can hold (its chunk of `grad_batches`)."""
    return -(-window_rows // grad_batch)


def emb_shape(num_rows: int, views: int, dim: int) -> tuple[int, ...]:
    return (num_rows, 1 + views, dim) if views else (num_rows, dim)


def teacher_layout(num_rows: int, build: dict, dim: int) -> dict[str, tuple[tuple, tuple, str]]:
    """(shape, chunks, dtype) of one teacher's arrays: embeddings, gradients, its build's `blocks_done`."""
    rows, dtype = build["chunk_rows"], DTYPES[build["dtype"]]
    arrays = {"image_emb": (emb_shape(num_rows, build["views"], dim), dtype), "text_emb": ((num_rows, dim), dtype)}
    if build["grads"]:
        arrays |= {"image_grad": ((num_rows, dim), GRAD_DTYPE), "text_grad": ((num_rows, dim), GRAD_DTYPE)}
    layout = {name: (shape, (rows,) + shape[1:], dtype) for name, (shape, dtype) in arrays.items()}
    # one chunk per block, so ranks mark their own blocks without touching each other's chunk files
    return layout | {"blocks_done": ((-(-num_rows // rows),), (1,), "bool")}


def shared_layout(num_rows: int, build: dict) -> dict[str, tuple[tuple, tuple, str]]:
    """(shape, chunks, dtype) of the arrays all teachers share: valid flags, the samples' digests, views,
    gradient batches."""
    views, rows = build["views"], build["chunk_rows"]
    arrays = {"valid": ((num_rows,), "bool"), "sample_crc32c": ((num_rows,), "uint32")}
    if views:
        arrays |= {"view_boxes": ((num_rows, views, 4), "float64"), "view_flips": ((num_rows, views), "bool")}
    layout = {name: (shape, (rows,) + shape[1:], dtype) for name, (shape, dtype) in arrays.items()}
    if build["grads"]:  # one chunk per window: the rank that computes a window writes its chunk alone
        n_blocks = -(-num_rows // rows)
        n_windows = -(-n_blocks // build["window_blocks"])
        slots = grad_slots(build["window_blocks"] * rows, build["grad_batch"])
        layout["grad_batches"] = ((n_windows * slots, build["grad_batch"]), (slots, build["grad_batch"]), "int64")
    return layout


def create_arrays(group: zarr.Group, layout: dict[str, tuple[tuple, tuple, str]]) -> None:
    for name, (shape, chunks, dtype) in layout.items():
        if name == "blocks_done":
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=False)
        else:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=CHECKSUM,
                               fill_value=-1 if name == "grad_batches" else 0)


def create_store(url: str, attrs: dict, index: CorpusIndex) -> zarr.Group:
    """Create an empty store with every array (the data is filled in by the build) and the corpus index."""
    build, num_rows = attrs["build"], index.num_samples
    group = zarr.open_group(url, mode="w")
    create_arrays(group, teacher_layout(num_rows, build, attrs["embed_dim"]) | shared_layout(num_rows, build))
    write_index(group.create_group("index"), index)
    group.attrs.update({**attrs, "content_hash": content_hash(attrs), "complete": False})
    return group


def create_teacher_group(root: zarr.Group, name: str, teacher_attrs: dict) -> zarr.Group:
    """teachers/<name>/: an added teacher's empty arrays, over the root's rows and build options."""
    group = root.require_group(TEACHERS).create_group(name)
    stored = dict(root.attrs)
    create_arrays(group, teacher_layout(root["valid"].shape[0], stored["build"], teacher_attrs["embed_dim"]))
    group.attrs.update({**teacher_attrs, "content_hash": content_hash(stored | teacher_attrs), "complete": False})
    return group


def teacher_group(url: str, name: str, mode: str = "r+") -> zarr.Group:
    """The group holding a teacher's arrays: the root for the build's teacher, teachers/<name>/ otherwise."""
    root = zarr.open_group(url, mode=mode)
    return root if name == MAIN_TEACHER else root[f"{TEACHERS}/{name}"]


def broken_metadata(store: str, error: json.JSONDecodeError) -> str:
    return (f"store {store} has a broken metadata file ({error.msg}, line {error.lineno} column {error.colno}): "
            f"rebuild it with `kd-cache build --overwrite`")


def open_group(url: str, mode: str = "r") -> zarr.Group:
    """A store's root group; a clear error for a missing or unreadable one."""
    try:
        if not exists(join(url, "zarr.json")):
            raise CacheError(f"cache {url} is not a Zarr store (no zarr.json): build it with `kd-cache build`")
        return zarr.open_group(url, mode=mode)
    except json.JSONDecodeError as e:
        raise CacheError(broken_metadata(url, e)) from e
    except StorageError as e:
        raise CacheError(str(e)) from e


def store_index(url: str) -> CorpusIndex | None:
    """The corpus index kept in a store (complete or not), or None when there is none to use."""
    try:
        return read_index(zarr.open_group(url, mode="r")["index"])
    except Exception:  # noqa: BLE001 - no store yet, or none usable: the corpus is indexed from the shards
        return None


def read_chunked(array: zarr.Array, start: int, stop: int, what: str) -> np.ndarray:
    """array[start:stop]; a checksum or decoding failure becomes a CacheError naming `what`, the array and chunk."""
    try:
        return read_rows(array, start, stop)
    except ChunkDamage as e:
        raise CacheError(f"{what}: {e}; rebuild the store with `kd-cache build --overwrite`") from e


class CacheStore:
    """Read side of a finished store, for stage two, evaluation and verify: one teacher's view of it (the build's
    teacher by default; `teacher(name)` for another). Arrays shared by all teachers (valid, views, gradient
    batches, index, captions) come from the root, the teacher's own arrays and attributes from its group."""

    def __init__(self, url: str, teacher: str = MAIN_TEACHER):
        self.path = str(url)
        self.group = open_group(self.path)
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"cache {self.path} has format version {self.attrs.get('format_version')}, "
                             f"this package reads {FORMAT_VERSION}: rebuild it with `kd-cache build --overwrite`")
        if not self.attrs.get("complete"):
            raise CacheError(f"cache {self.path} is incomplete (an interrupted build): re-run the same "
                             f"`kd-cache build` command to finish it")
        if self.attrs.get("content_hash") != content_hash(self.attrs):
            raise CacheError(f"cache {self.path}: its attributes were changed after the build (content hash "
                             f"mismatch in zarr.json): rebuild it with `kd-cache build --overwrite`")
        if "complete_hash" in self.attrs and self.attrs["complete_hash"] != content_hash(self.attrs, COMPLETE_KEYS):
            raise CacheError(f"cache {self.path}: its attributes were changed after the build finished (complete "
                             f"hash mismatch in zarr.json: {', '.join(COMPLETE_KEYS[len(CONTENT_KEYS):])}): rebuild it "
                             f"with `kd-cache build --overwrite`")
        self.teacher_name, self.teacher_group = teacher, self.group
        if teacher != MAIN_TEACHER:
            self.teacher_group = self._added_teacher(teacher)
            own = dict(self.teacher_group.attrs)
            self.attrs = self.attrs | {k: own.get(k) for k in TEACHER_ATTRS} | {"content_hash": own["content_hash"]}
            if own["content_hash"] != content_hash(self.attrs):
                raise CacheError(f"cache {self.path}: teacher {teacher}'s attributes were changed after it was "
                                 f"added (content hash mismatch): add it again under another name")
        self._checked: set[str] = set()
        self._index: CorpusIndex | None = None

    def _added_teacher(self, name: str) -> zarr.Group:
        status = self.teacher_status()
        if name not in status:
            raise CacheError(f"cache {self.path} has no teacher {name!r}; it has {', '.join(status)}: add one with "
                             f"`kd-cache add-teacher {self.path} --name {name} ...`")
        if status[name] != "complete":
            raise CacheError(f"cache {self.path}: teacher {name!r} is {status[name]} (an interrupted add-teacher): "
                             f"re-run the same `kd-cache add-teacher` command to finish it")
        return self.group[f"{TEACHERS}/{name}"]

    def teacher_status(self) -> dict[str, str]:
        """Every teacher in the store, the build's first: 'complete' or 'incomplete'."""
        status = {MAIN_TEACHER: "complete"}
        if TEACHERS in self.group:
            for name, group in sorted(self.group[TEACHERS].groups()):
                status[name] = "complete" if group.attrs.get("complete") else "incomplete"
        return status

    def teacher_names(self) -> list[str]:
        return [name for name, state in self.teacher_status().items() if state == "complete"]

    def teacher(self, name: str) -> "CacheStore":
        """The same store seen from another of its teachers (the corpus index is shared, not read again)."""
        other = CacheStore(self.path, name)
        other._index = self._index
        return other

    def _group_of(self, name: str) -> zarr.Group:
        return self.teacher_group if name in TEACHER_ARRAYS else self.group

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

    @property
    def teacher_logit_bias(self) -> float | None:
        """A sigmoid-loss teacher's bias (its gradients are those of the sigmoid loss); None for softmax CLIP."""
        bias = self.attrs.get("teacher_logit_bias")
        return None if bias is None else float(bias)

    @property
    def dtype(self) -> str:
        return self.attrs["build"]["dtype"]

    def has(self, name: str) -> bool:
        return name in self._group_of(name)

    def nbytes(self, name: str) -> int:
        """Bytes the array takes in memory, without reading it."""
        array = self._group_of(name)[name]
        return int(np.prod(array.shape)) * array.dtype.itemsize

    def require(self, names, why: str = "") -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            who = "" if self.teacher_name == MAIN_TEACHER else f" (teacher {self.teacher_name})"
            raise CacheError(f"cache {self.path}{who} lacks array(s) {missing}"
                             f"{' needed by ' + why if why else ''}: rebuild it with a current `kd-cache build` "
                             f"(gradients need the default --grads; caption embeddings `kd-cache captions`)")

    def array(self, name: str) -> zarr.Array:
        """The array, once checked to have the shape, chunks and dtype its build gives it, and every chunk (a
        missing chunk would read back as zeros)."""
        self.require([name])
        array = self._group_of(name)[name]
        if name not in self._checked:
            build, rows = self.attrs["build"], self.attrs["corpus"]["num_samples"]
            expected = (teacher_layout(rows, build, self.embed_dim) | shared_layout(rows, build)).get(name)
            found = (tuple(array.shape), tuple(array.chunks), str(array.dtype))
            if expected is not None and found != expected:
                raise CacheError(f"cache {self.path}: array {array.name.strip('/')} has shape {found[0]}, chunks "
                                 f"{found[1]}, dtype {found[2]}, where its build makes {expected[0]}, {expected[1]}, "
                                 f"{expected[2]}: its zarr.json was edited or damaged; rebuild the store with "
                                 f"`kd-cache build --overwrite`")
            if array.nchunks_initialized != array.nchunks:
                raise CacheError(f"cache {self.path}: array {name} has {array.nchunks_initialized} of its "
                                 f"{array.nchunks} chunk files; the store is damaged: rebuild it with "
                                 f"`kd-cache build --overwrite`")
            self._checked.add(name)
        return array

    def load(self, name: str) -> np.ndarray:
        """A whole array in memory, as stored (zarr reads its chunks in parallel; never row by row)."""
        array = self.array(name)
        return read_chunked(array, 0, array.shape[0], f"cache {self.path}")

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows of an array, as stored, reading only the chunks that hold them."""
        return ChunkedRows(self.array(name), max_chunks=1, what=f"cache {self.path}").take(np.asarray(rows))

    def index(self) -> CorpusIndex:
        """The store's corpus index, read once (opening the corpus and joining it to the store both use it)."""
        if self._index is None:
            try:
                index = read_index(self.group["index"])
                if index.shard_identities() != self.attrs["corpus"]["shards"]:
                    raise ValueError("its shards (names, sizes, counts) are not those of the attributes' corpus")
            except (ValueError, KeyError) as e:  # a damaged chunk, broken metadata, arrays that do not fit
                raise CacheError(f"cache {self.path}: its corpus index is damaged: {e}; rebuild the store with "
                                 f"`kd-cache build --overwrite`") from e
            self._index = index
        return self._index

    def to_float(self, name: str, stored: np.ndarray) -> np.ndarray:
        """float32 targets from stored rows: gradients unscaled, int8 embeddings re-normalised."""
        if name.endswith("_grad"):
            return stored.astype(np.float32) / np.float32(self.attrs["grad_scale"])
        return dequantize(stored)


def quantize(emb: np.ndarray, dtype: str) -> np.ndarray:
    """Stored form of L2-normalised embeddings: a cast, or for int8 each row scaled to ±127 at its largest entry
    (the norm is restored on reading, so no scale is stored)."""
    if dtype != "int8":
        return emb.astype(DTYPES[dtype])
    peak = np.abs(emb).max(axis=-1, keepdims=True)
    return np.round(emb * (127 / np.where(peak > 0, peak, 1))).astype(np.int8)


def dequantize(stored: np.ndarray) -> np.ndarray:
    """float32 embeddings from stored rows (int8 rows re-normalised to unit length; zero rows stay zero)."""
    out = stored.astype(np.float32)
    if stored.dtype == np.int8:
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        out /= np.where(norm > 0, norm, 1)
    return out


def join_to_cache(corpus: Corpus, cache: CacheStore) -> np.ndarray:
    """Cache row of every corpus row, by shard identity (name, size, count) and keys; refuses other data. A shard
    damaged since the build (kept with --on-error skip) joins by the keys of the samples before the damage, which
    must be the first of the store's."""
    stored = cache.index()
    where = {name: i for i, name in enumerate(stored.names)}
    rows = np.empty(corpus.num_samples, dtype=np.int64)
    mine = corpus.index
    # a foreign shard is nearly always a --data slip (val for train, another folder's 00000.tar): name the store's
    built = (f"cache {cache.path} was built from {len(stored.urls)} shard(s), --data {as_spec(stored.urls)!r}: "
             f"give those (or some of them) as --data")
    for shard, (name, start) in enumerate(zip(mine.names, mine.first_rows)):
        i = where.get(name)
        url = mine.urls[shard]
        if i is None:
            raise CacheError(f"shard {url} is not in the cache. {built}, or build a cache for this data")
        count, size = int(mine.counts[shard]), int(mine.sizes[shard])
        damaged = bool(mine.errors[shard])
        if count > stored.counts[i] or not damaged and (count != stored.counts[i] or size != stored.sizes[i]):
            raise CacheError(f"shard {url} is not the {name} the cache holds ({count} samples / {size} bytes, the "
                             f"cache's {stored.counts[i]} / {stored.sizes[i]}). {built}; rebuild the cache only "
                             f"if its shards changed since")
        (a_bytes, a_len), (b_bytes, b_len) = mine.shard_key_bytes(shard), stored.shard_key_bytes(i)
        b_len = b_len[:count]  # a damaged shard: the store's first samples (all of them otherwise)
        b_bytes = b_bytes[:int(b_len.sum())]
        if not (np.array_equal(a_len, b_len) and np.array_equal(a_bytes, b_bytes)):
            raise CacheError(f"shard {url}: its keys are not those of the {name} the cache holds. {built}; rebuild "
                             f"the cache only if its shards changed since")
        rows[start:start + count] = np.arange(stored.first_rows[i], stored.first_rows[i] + count)
    return rows


def damage_in_cache(corpus: Corpus, cache: CacheStore, rows: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """What each shard damaged since the build (kept with --on-error skip) lost, counted exactly: the store's index
    still holds every sample of it. Returns `Corpus.lost`'s entries with `samples_before` the samples whose bytes
    are all there and `samples_lost` the rest of the store's (None for a shard the store was built from damaged:
    it does not know either), and which corpus rows are intact (False for a sample the damage cuts through).
    `rows`: `join_to_cache`'s."""
    stored, mine = cache.index(), corpus.index
    intact = np.ones(corpus.num_samples, dtype=bool)
    lost = []
    for entry, shard in zip(corpus.lost, (s for s, error in enumerate(mine.errors) if error)):
        own = np.arange(mine.first_rows[shard], mine.first_rows[shard] + mine.counts[shard])
        (begins, ends), (stored_begins, stored_ends) = mine.spans(own), stored.spans(rows[own])
        # a sample is whole where its span is the store's and lies inside the file (the bytes are checked on read)
        whole = (begins == stored_begins) & (ends == stored_ends) & (ends <= mine.sizes[shard])
        intact[own] = whole
        i = stored.names.index(mine.names[shard])
        lost.append(entry | {"samples_before": int(whole.sum()),
                             "samples_lost": None if stored.errors[i] else int(stored.counts[i] - whole.sum())})
    return lost, intact


class ChunkedRows:
    """Rows of a Zarr array too big for memory, read chunk-aware: a request reads the whole chunks that hold its
    rows (one read each, never row by row) and keeps the last `max_chunks` of them, so shuffled batches drawn from
    a window of nearby rows (shard order + shuffle buffer) mostly hit chunks already in memory.
    Same call as numpy's `array.take(rows, axis=0)`, so in-memory and chunked targets are used alike."""

    def __init__(self, array: zarr.Array, max_chunks: int, what: str = "cache"):
        self.array, self.max_chunks, self.what = array, max(1, max_chunks), what
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
            self.chunks[number] = read_chunked(self.array, start, start + self.chunk_rows, self.what)
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
