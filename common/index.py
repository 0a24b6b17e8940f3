"""The corpus index: where every sample of every shard lies, in a few flat arrays (bytes, not Python objects).

Per sample (N rows, in corpus row order): the byte offset of its first tar header (int64) and its key (UTF-8
bytes, concatenated, with an int64 end offset per sample): about 16 + len(key) bytes per sample. A sample's bytes
run from its offset to the next sample's offset (or the shard's end of data), so one ranged read returns all its
members. Per shard (S rows): URL, file name, byte size, version tag (mtime or ETag), sample count, end of data,
and the damage found while scanning, if any.

The index is built once by scanning the tar headers (in parallel across torchrun ranks), then kept as a Zarr group:
inside the teacher store (`index/`, written by `kd-cache build`), and as a sidecar for corpora without a store
(`$KD_CACHE_DIR/index/<hash of the shard URLs>.zarr`). Later processes load it in time proportional to the shard
count plus a copy of the arrays, and re-scan only shards whose size or version changed since.

Like webdataset's `wids` shard index (a shard list with per-shard sample counts), it fixes the row of every sample
before anything is decoded; unlike it, it also records where each sample's bytes are, so no process parses a tar
again and remote shards are read with ranged requests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from webdataset.tariterators import base_plus_ext

from common import dist
from common.storage import Stat, StorageError, cache_dir, describe_failure, is_remote, open_sequential

log = logging.getLogger("kd-index")
# Every chunk of a finished store or index is written, even one equal to the fill value (all-zero flips, an
# all-invalid block, no shard errors), so a missing chunk file is damage, never "zeros". It is a runtime setting in
# zarr, not stored metadata.
zarr.config.set({"array.write_empty_chunks": True})
INDEX_VERSION = 1
BLOCK = 512
CHECKSUM = (Crc32cCodec(),)  # every chunk of a store's arrays and of an index (the store's or a sidecar)
SCAN_THREADS = 8  # concurrent remote shard scans per process (I/O bound)


def skipped_member(name: str, key: str | None, is_regular: bool) -> bool:
    """Members webdataset's grouping ignores: directories, links, names without an extension, `__*` files."""
    return not is_regular or key is None or name.rsplit("/", 1)[-1].startswith("__")


@dataclass
class ShardScan:
    """One shard's part of the index."""
    url: str
    name: str
    stat: Stat
    offsets: np.ndarray  # int64 (count,)
    key_blob: np.ndarray  # uint8: the UTF-8 keys, concatenated
    key_lengths: np.ndarray  # int64 (count,)
    end: int  # end of the last sample's data (padded to a tar block)
    error: str = ""  # damage found: samples after it are not indexed

    @property
    def count(self) -> int:
        return len(self.offsets)

    @staticmethod
    def encode_keys(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [k.encode("utf-8") for k in keys]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), lengths


class _SpecialHeader(Exception):
    """A pax / GNU long-name header: the shard is read with tarfile instead."""


_REGULAR = (b"0", b"\0", b"7")
_PLAIN = _REGULAR + (b"1", b"2", b"3", b"4", b"5", b"6")


def _ustar_members(stream, state: dict) -> Iterator[tuple[str, int, int, int, bool]]:
    """(name, header offset, data offset, size, is regular) of plain ustar/GNU members, reading only headers (about
    6x faster than tarfile, which decodes every field). Stops at the end-of-archive block or at a header whose
    checksum fails; the caller compares where it stopped with the file size."""
    pos = 0
    while True:
        stream.seek(pos)
        block = stream.read(BLOCK)
        field = block[148:156].split(b"\0", 1)[0].strip()
        if (len(block) < BLOCK or block == bytes(BLOCK) or not field.isdigit()
                or int(field, 8) != sum(block) - sum(block[148:156]) + 256):
            state["stopped_at"] = pos
            return
        kind = block[156:157]
        if kind not in _PLAIN:
            raise _SpecialHeader(kind)
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345]:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int.from_bytes(block[125:136], "big") if block[124] & 0x80 else int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        yield name.decode("utf-8", "surrogateescape"), pos, pos + BLOCK, size, kind in _REGULAR
        pos += BLOCK + -(-size // BLOCK) * BLOCK


def _tarfile_members(stream, state: dict) -> Iterator[tuple[str, int, int, int, bool]]:
    """The same as _ustar_members through Python's tarfile (pax and GNU extensions)."""
    stream.seek(0)
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for member in tar:
            yield member.name, member.offset, member.offset_data, member.size, member.isreg()
        state["stopped_at"] = tar.offset


def scan_shard(url: str, name: str, stat: Stat) -> ShardScan:
    """Read a shard's tar headers front to back: sample keys (webdataset's grouping rule) and offsets.

    A tar whose headers stop before its data does (a damaged header, which Python's tarfile takes for the end of
    the archive), whose last member runs past the end of the file, or that ends without the end-of-archive blocks
    (cut off between two members) is reported in `error`, with the samples before the damage kept."""
    error, state = "", {}
    offsets: list[int] = []
    keys: list[str] = []
    end = 0
    try:
        with open_sequential(url) as stream:
            for members in (_ustar_members, _tarfile_members):
                offsets, keys, end = [], [], 0
                try:
                    for member, header, data, size, regular in members(stream, state):
                        key, _ = base_plus_ext(member)
                        if skipped_member(member, key, regular):
                            continue
                        if not keys or keys[-1] != key:
                            keys.append(key)
                            offsets.append(header)
                        end = data + -(-size // BLOCK) * BLOCK
                    break
                except _SpecialHeader:
                    continue
            tail_at = state["stopped_at"]  # end-of-archive blocks, or a header that does not parse
            if tail_at > stat.size or end > stat.size:
                error = f"truncated: the last member needs {max(tail_at, end)} bytes, the file has {stat.size}"
            elif 0 < tail_at == stat.size:  # every tar writer ends an archive with zero blocks
                error = (f"truncated: the file ends at byte {tail_at}, after a member, without the tar "
                         f"end-of-archive blocks")
            elif tail_at < stat.size:
                stream.seek(tail_at)
                tail = stream.read(min(stat.size - tail_at, 2 * BLOCK))
                if tail.strip(b"\0"):
                    error = (f"damaged tar header at byte {tail_at} (the archive's data goes on after it; "
                             f"GNU tar reports this file as damaged too)")
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        if is_remote(url) and not isinstance(e, (tarfile.TarError, EOFError)):
            raise describe_failure(url, e) from e
        error = f"corrupt tar: {e}"
    if error:
        error += f" ({len(keys)} samples indexed before it)"
    return ShardScan(url, name, stat, np.asarray(offsets, dtype=np.int64), *ShardScan.encode_keys(keys), end, error)


@dataclass
class CorpusIndex:
    """The flat index of a list of shards (see module docstring)."""
    urls: list[str]
    names: list[str]
    sizes: np.ndarray  # int64 (S,)
    versions: list[str]
    counts: np.ndarray  # int64 (S,)
    ends: np.ndarray  # int64 (S,): end of each shard's sample data
    errors: list[str]
    offsets: np.ndarray  # int64 (N,)
    key_ends: np.ndarray  # int64 (N,): key i is key_bytes[key_ends[i-1]:key_ends[i]]
    key_bytes: np.ndarray  # uint8
    first_rows: np.ndarray = field(init=False)

    def __post_init__(self):
        self.first_rows = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.key_ends.nbytes + self.key_bytes.nbytes

    def shard_identities(self) -> list[dict]:
        """What identifies each shard for provenance: name, byte size, sample count."""
        return [{"name": n, "size": int(s), "count": int(c)} for n, s, c in zip(self.names, self.sizes, self.counts)]

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_rows, rows, side="right") - 1

    def key(self, row: int) -> str:
        start = int(self.key_ends[row - 1]) if row else 0
        return self.key_bytes[start:int(self.key_ends[row])].tobytes().decode("utf-8")

    def keys(self, start: int = 0, stop: int | None = None) -> list[str]:
        stop = self.num_samples if stop is None else stop
        return [self.key(row) for row in range(start, stop)]

    def shard_key_bytes(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(key bytes, key lengths) of one shard's samples: compared whole to check sample identity."""
        first, count = int(self.first_rows[shard]), int(self.counts[shard])
        begin = int(self.key_ends[first - 1]) if first else 0
        ends = self.key_ends[first:first + count]
        stop = int(ends[-1]) if count else begin
        return self.key_bytes[begin:stop], np.diff(ends, prepend=begin)

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte range [start, end) of each row's members in its shard."""
        rows = np.asarray(rows, dtype=np.int64)
        shard = self.shard_of(rows)
        nxt = rows + 1
        last = nxt >= self.first_rows[shard] + self.counts[shard]
        ends = np.where(last, self.ends[shard], self.offsets[np.minimum(nxt, self.num_samples - 1)])
        return self.offsets[rows], ends

    @classmethod
    def from_scans(cls, scans: list[ShardScan]) -> "CorpusIndex":
        concat = lambda arrays, dtype: np.concatenate(arrays) if arrays else np.zeros(0, dtype)  # noqa: E731
        return cls(
            urls=[s.url for s in scans], names=[s.name for s in scans],
            sizes=np.array([s.stat.size for s in scans], dtype=np.int64), versions=[s.stat.version for s in scans],
            counts=np.array([s.count for s in scans], dtype=np.int64),
            ends=np.array([s.end for s in scans], dtype=np.int64), errors=[s.error for s in scans],
            offsets=concat([s.offsets for s in scans], np.int64),
            key_ends=np.cumsum(concat([s.key_lengths for s in scans], np.int64)),
            key_bytes=concat([s.key_blob for s in scans], np.uint8),
        )

    def shard_scan(self, shard: int) -> ShardScan:
        """One shard's entries as a ShardScan (to reassemble an index from parts of others)."""
        first, count = int(self.first_rows[shard]), int(self.counts[shard])
        return ShardScan(self.urls[shard], self.names[shard], Stat(int(self.sizes[shard]), self.versions[shard]),
                         self.offsets[first:first + count], *self.shard_key_bytes(shard), int(self.ends[shard]),
                         self.errors[shard])


# ------------------------------------------------------------------ persistence (a Zarr group)

_SHARD_ARRAYS = ("urls", "names", "versions", "errors")
_NUMERIC = ("sizes", "counts", "ends", "offsets", "key_ends", "key_bytes")


def write_index(group: zarr.Group, index: CorpusIndex) -> None:
    """Write the index's arrays into `group` (created by the caller: a store's `index/` or a sidecar), every chunk
    with a CRC32C checksum."""
    for name in _SHARD_ARRAYS:
        values = np.array(getattr(index, name), dtype=str)
        group.create_array(name, shape=values.shape, dtype=str, chunks=(max(len(values), 1),),
                           fill_value="", overwrite=True, compressors=CHECKSUM)[...] = values
    for name in _NUMERIC:
        values = getattr(index, name)
        chunks = (max(1, min(len(values), 1 << 22)),)
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks, fill_value=0,
                                   overwrite=True, compressors=CHECKSUM)
        array[...] = values
    group.attrs["index_version"] = INDEX_VERSION


class ChunkDamage(ValueError):
    """A chunk that fails its checksum or does not decode (the message names the array and the chunk)."""


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """array[start:stop]; a checksum or decoding failure becomes a ChunkDamage naming the array and chunk."""
    try:
        return array[start:stop]
    except (ValueError, RuntimeError) as e:
        rows = array.chunks[0]
        for first in range(start - start % rows, stop, rows):  # find the chunk at fault
            try:
                array[first:first + rows]
            except (ValueError, RuntimeError):
                raise ChunkDamage(f"array {array.name.strip('/')}, chunk {first // rows} (rows {first}.."
                                  f"{min(first + rows, array.shape[0]) - 1}) is damaged ({e})") from e
        raise


def read_index(group: zarr.Group) -> CorpusIndex:
    if group.attrs.get("index_version") != INDEX_VERSION:
        raise ValueError(f"index version {group.attrs.get('index_version')}, expected {INDEX_VERSION}")
    for name in _SHARD_ARRAYS + _NUMERIC:
        array = group[name]
        if array.nchunks_initialized != array.nchunks:
            raise ValueError(f"array {array.name.strip('/')} has {array.nchunks_initialized} of its {array.nchunks} "
                             f"chunk files")
    whole = lambda name: read_rows(group[name], 0, group[name].shape[0])  # noqa: E731
    parts = {name: [str(v) for v in whole(name)] for name in _SHARD_ARRAYS}
    parts |= {name: whole(name) for name in _NUMERIC}
    index = CorpusIndex(**parts)
    check_consistent(index)
    return index


def check_consistent(index: CorpusIndex) -> None:
    """The arrays fit together (an edited shape or a stray value would otherwise misplace samples)."""
    shards = len(index.names)
    if not all(len(values) == shards for values in (index.urls, index.versions, index.errors, index.sizes,
                                                      index.counts, index.ends)):
        raise ValueError(f"the per-shard arrays do not all have {shards} entries")
    if int(index.counts.sum()) != index.num_samples or len(index.key_ends) != index.num_samples:
        raise ValueError(f"the shards count {int(index.counts.sum())} samples, offsets has {index.num_samples} and "
                         f"key_ends {len(index.key_ends)}")
    if index.num_samples and (int(index.key_ends[-1]) != len(index.key_bytes) or (np.diff(index.key_ends) < 0).any()):
        raise ValueError("key_ends does not rise to the length of key_bytes")


def sidecar_url(urls: list[str]) -> str:
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:24]
    return str(cache_dir() / "index" / f"{digest}.zarr")


def load_sidecar(urls: list[str]) -> CorpusIndex | None:
    """The sidecar of `urls`, or None when there is none yet, or when it is damaged, unreadable or unchecked (its
    shards are then indexed again, and the sidecar rewritten)."""
    path = sidecar_url(urls)
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    try:
        unchecked = [name for name in _SHARD_ARRAYS + _NUMERIC
                     if not any(isinstance(codec, Crc32cCodec) for codec in group[name].compressors)]
        if unchecked:
            raise ValueError(f"{', '.join(unchecked)} have no checksums (written by an older version)")
        return read_index(group)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, zarr.errors.BaseZarrError) as e:
        log.warning("corpus index sidecar %s is damaged or unreadable (%s): indexing its shards again", path, e)
        return None


def save_sidecar(index: CorpusIndex) -> None:
    """Write the sidecar atomically (a new directory renamed into place), so readers never see half of one."""
    final = sidecar_url(index.urls)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_index(zarr.open_group(tmp, mode="w"), index)
    shutil.rmtree(final, ignore_errors=True)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(tmp, final)


# ------------------------------------------------------------------ assembling an index for a list of shards

def assemble(urls: list[str], names: list[str], stats: list[Stat], known: list[CorpusIndex]) -> tuple[CorpusIndex, int]:
    """The index of `urls`: each shard's entries from a known index when its name, size and version match there,
    otherwise scanned now (spread over torchrun ranks, and over threads for remote shards). Returns the index
    and the number of shards scanned."""
    for index in known:
        if (index.names == names and index.sizes.tolist() == [s.size for s in stats]
                and index.versions == [s.version for s in stats]):
            return dataclasses.replace(index, urls=list(urls)), 0  # a copy: the known index stays as stored
    by_name: dict[str, tuple[CorpusIndex, int]] = {}
    for index in known:
        for i, name in enumerate(index.names):
            by_name.setdefault(name, (index, i))
    parts: list[ShardScan | None] = []
    stale = []
    for i, (url, name, stat) in enumerate(zip(urls, names, stats)):
        hit = by_name.get(name)
        if hit and int(hit[0].sizes[hit[1]]) == stat.size and hit[0].versions[hit[1]] == stat.version:
            scan = hit[0].shard_scan(hit[1])
            scan.url = url
            parts.append(scan)
        else:
            if hit:
                log.info("shard %s changed since it was indexed (size/version): indexing it again", url)
            parts.append(None)
            stale.append(i)
    if stale:
        rank, world = dist.rank_world()
        mine = stale[rank::world]
        with ThreadPoolExecutor(SCAN_THREADS if any(is_remote(urls[i]) for i in mine) else 1) as pool:
            scans = list(pool.map(lambda i: scan_shard(urls[i], names[i], stats[i]), mine))
        for part in dist.all_gather_objects(list(zip(mine, scans))):
            for i, scan in part:
                parts[i] = scan
    return CorpusIndex.from_scans(parts), len(stale)


def span_members(span: bytes) -> Iterator[tuple[str, bool, bytes]]:
    """(member name, is a regular file, data) of the tar members in one sample's byte span (the same header
    reader as the index scan, tarfile only for pax / GNU long-name headers)."""
    stream = io.BytesIO(span)
    try:
        members = list(_ustar_members(stream, {}))
    except _SpecialHeader:
        members = list(_tarfile_members(stream, {}))
    for name, _, data, size, regular in members:
        yield name, regular, span[data:data + size] if regular else b""
