"""The one corpus reader: webdataset shards (img2dataset layout) -> samples that carry their identity.

A corpus is a list of tar shards, local or remote (any fsspec URL, or `pipe:CMD`; see storage.py).
`Corpus.open(spec)` loads the corpus index (index.py: flat arrays, built once and kept beside the store or as a
sidecar), which fixes the row of every sample: rows follow shard order, then order inside the shard. Rows never
shift: a sample that cannot be decoded still has its row (marked invalid).

Reading is by byte ranges from the index: a range of rows is one ranged read per shard (the build's blocks,
evaluation batches), a set of rows is one ranged read per sample, grouped by shard (the training loader's
shuffled rows), never a second parse of the tar.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Sequence

import braceexpand
import google_crc32c
import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from common import dist
from common.decode import decode_sample
from common.defaults import ON_ERROR_CHOICES
from common.index import CorpusIndex, assemble, load_sidecar, save_sidecar, skipped_member, span_members
from common.storage import RangeReader, StorageError, basename, list_tars, stat_many

log = logging.getLogger("kd-corpus")
MAX_READ_BYTES = 32 << 20  # one ranged read covers consecutive samples up to this many bytes


class CorpusError(ValueError):
    """A shard spec, shard or sample that cannot be read, naming the shard and key at fault."""


def natural_key(text: str) -> list:
    """Sort key that orders numbers by value: 2.tar before 10.tar."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def expand_spec(spec: str | Sequence[str]) -> list[str]:
    """Shard locations from a spec: brace patterns (`shards/{00000..00099}.tar`, `s3://b/cc3m/{0..331}.tar`),
    directories or prefixes (their *.tar, in natural order), files, `pipe:CMD`, and lists of any of these (a
    Python list or '::'-separated, as webdataset writes them)."""
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    parts = [p for part in parts for p in str(part).split("::") if p]
    urls: list[str] = []
    for part in parts:
        for item in braceexpand.braceexpand(part):
            try:
                listed = list_tars(item)
            except StorageError as e:
                raise CorpusError(f"data spec {part!r}: {e}") from e
            if listed is None:
                urls.append(item)
            elif listed:
                urls.extend(sorted(listed, key=natural_key))
            else:
                raise CorpusError(f"data spec {part!r}: directory {item} holds no .tar shard")
    if not urls:
        raise CorpusError(f"data spec {spec!r} matches no shard")
    if len(set(urls)) != len(urls):
        raise CorpusError(f"data spec {spec!r} names a shard twice")
    return urls


def as_spec(urls: Sequence[str]) -> str:
    """A --data value naming `urls` (expand_spec's inverse): a brace pattern when they are one folder's shards
    numbered in a row at one width (`d/{00000..00003}.tar`), else the '::'-separated list."""
    found = [re.fullmatch(r"(.*/)?(\d+)\.tar", url) for url in urls]
    if len(urls) > 1 and all(found):
        numbers = [int(m.group(2)) for m in found]
        if (len({m.group(1) for m in found}) == 1 and len({len(m.group(2)) for m in found}) == 1
                and numbers == list(range(numbers[0], numbers[0] + len(numbers)))):
            return f"{found[0].group(1) or ''}{{{found[0].group(2)}..{found[-1].group(2)}}}.tar"
    return "::".join(urls)


@dataclass
class Sample:
    """A decoded sample and its identity (row in the corpus, shard, index in shard, __key__)."""
    row: int
    shard: str
    index: int
    key: str
    image: Image.Image | None = None
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    error: str | None = None  # why the sample is invalid (only with on_error='skip')
    digest: int = 0  # CRC32C of the sample's bytes (its tar members): a store records it, reads compare it

    @property
    def caption(self) -> str:
        """The caption that training and the cache use: the first line of the .txt."""
        if not self.captions:
            raise CorpusError(f"shard {self.shard}, key {self.key}: no caption (.txt); a classification sample "
                              f"(.cls only) can be evaluated with `kd-eval zeroshot` but not cached or trained on")
        return self.captions[0]


def changed_since(store: str, found: int, expected: int) -> str:
    return f"its bytes changed since cache {store} was built (CRC32C {found:08x}, the cache recorded {expected:08x})"


def changed_sample_error(shard: str, key: str, reason: str) -> CorpusError:
    return CorpusError(f"shard {shard}, key {key}: {reason}: restore the shard or rebuild the cache for it "
                       f"(`kd-cache build --overwrite`), or pass --on-error skip to leave such samples out")


def check_digest(sample: Sample, expected: int, on_error: str, store: str) -> None:
    """Refuse (or, with on_error='skip', mark invalid) a sample whose bytes are not those a store was built from:
    a shard changed in place keeps its name, size and keys, not its members' bytes."""
    if sample.error is None and sample.digest != expected:
        reason = changed_since(store, sample.digest, expected)
        if on_error == "raise":
            raise changed_sample_error(sample.shard, sample.key, reason)
        sample.error = reason


class Corpus:
    """Indexed shards with a fixed row for every sample."""

    def __init__(self, index: CorpusIndex, spec: str = ""):
        self.spec = spec
        self.index = index
        self.first_rows, self.counts = index.first_rows, index.counts
        self.num_samples = index.num_samples
        self.reader = RangeReader()

    @classmethod
    def open(cls, spec: str | Sequence[str], on_error: str = "raise",
             known: Sequence[CorpusIndex] = ()) -> "Corpus":
        """Index of the shards from `known` indexes (a store's) or the sidecar where their size and version still
        match, scanning the rest (and saving the sidecar when anything was scanned)."""
        if on_error not in ON_ERROR_CHOICES:
            raise CorpusError(f"--on-error {on_error!r}: choose one of {ON_ERROR_CHOICES}")
        urls = expand_spec(spec)
        names = [basename(u) for u in urls]
        if len(set(names)) != len(names):  # shard identity is its file name (provenance survives moving data)
            raise CorpusError(f"data spec {spec!r}: two shards share a file name; give each shard a unique name")
        try:
            stats = stat_many(urls)
            sidecar = load_sidecar(urls)
            index, scanned = assemble(urls, names, stats, list(known) + ([sidecar] if sidecar else []))
        except StorageError as e:
            raise CorpusError(str(e)) from e
        if scanned:
            log.info("indexed %d of %d shards (%d samples in all)", scanned, len(urls), index.num_samples)
            if os.environ.get("LOCAL_RANK", "0") == "0":
                try:
                    save_sidecar(index)
                except OSError as e:
                    log.warning("could not save the corpus index sidecar (%s): the next start indexes again", e)
            dist.barrier()
        for url, error in zip(index.urls, index.errors):
            if error and on_error == "raise":
                raise CorpusError(f"shard {url}: {error}. Repair or remove the shard, "
                                  f"or pass --on-error skip to use the samples before the damage")
        corpus = cls(index, spec if isinstance(spec, str) else "::".join(map(str, spec)))
        for lost in corpus.lost if dist.rank_world()[0] == 0 else []:
            log.warning("shard %s is damaged at byte %d (%s): its samples from there on are lost, the %d before it "
                        "are used (--on-error skip)", lost["shard"], lost["byte_offset"], lost["error"],
                        lost["samples_before"])
        if corpus.num_samples == 0:
            raise CorpusError(f"data spec {spec!r}: the shards hold no sample")
        return corpus

    @cached_property
    def keys(self) -> np.ndarray:
        """Every row's key (N Python strings: for small corpora and reports, not the hot path)."""
        return np.array(self.index.keys(), dtype=str)

    @property
    def errors(self) -> list[str]:
        return [f"{url}: {error}" for url, error in zip(self.index.urls, self.index.errors) if error]

    @property
    def lost(self) -> list[dict]:
        """Damaged shards, kept with --on-error skip: their samples from `byte_offset` on are lost (how many is not
        known: the damage hides them), `samples_before` are used."""
        index = self.index
        return [{"shard": url, "byte_offset": int(min(end, size)), "samples_before": int(count), "error": error}
                for url, error, end, size, count in zip(index.urls, index.errors, index.ends, index.sizes,
                                                        index.counts) if error]

    def description(self) -> dict:
        """What identifies the corpus for provenance: shard names, byte sizes and sample counts."""
        return {
            "num_samples": self.num_samples,
            "shards": self.index.shard_identities(),
        }

    def locate(self, row: int) -> tuple[int, int]:
        """(shard number, index in shard) of a row."""
        shard = int(self.index.shard_of(np.array([row]))[0])
        return shard, row - int(self.first_rows[shard])

    def read(self, start: int = 0, stop: int | None = None, on_error: str = "raise") -> Iterator[Sample]:
        """Samples of rows [start, stop) in row order, from ranged reads of consecutive samples. A bad sample
        raises CorpusError naming shard and key, or, with on_error='skip', comes back with `error` set."""
        for row, shard, blob, expected in self._spans(start, stop):
            yield self._sample(row, shard, blob, expected, on_error)

    def digests(self) -> np.ndarray:
        """Every row's `Sample.digest`, read without decoding anything."""
        return np.fromiter((google_crc32c.value(blob) for _, _, blob, _ in self._spans(0, None)), np.uint32,
                           self.num_samples)

    def _spans(self, start: int, stop: int | None) -> Iterator[tuple[int, int, bytes, int]]:
        """(row, shard, its bytes, the length the index expects) of rows [start, stop), in ranged reads of
        consecutive samples."""
        stop = self.num_samples if stop is None else stop
        row = start
        while row < stop:
            shard, _ = self.locate(row)
            rows = np.arange(row, min(stop, int(self.first_rows[shard] + self.counts[shard])))
            begins, ends = self.index.spans(rows)
            i = 0
            while i < len(rows):  # consecutive samples of one shard, up to MAX_READ_BYTES per read
                j = min(len(rows), i + max(1, int(np.searchsorted(ends[i:], begins[i] + MAX_READ_BYTES, "right"))))
                [blob] = self.reader.read(self.index.urls[shard], [int(begins[i])], [int(ends[j - 1])])
                for k in range(i, j):
                    yield (int(rows[k]), shard, blob[begins[k] - begins[i]:ends[k] - begins[i]],
                           int(ends[k] - begins[k]))
                i = j
            row = int(rows[-1]) + 1

    def read_rows(self, rows: np.ndarray, on_error: str = "raise") -> list[Sample]:
        """Samples of any rows (in the order given): one ranged read per sample, one request batch per shard."""
        rows = np.asarray(rows, dtype=np.int64)
        begins, ends = self.index.spans(rows)
        shards = self.index.shard_of(rows)
        out: list[Sample | None] = [None] * len(rows)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            blobs = self.reader.read(self.index.urls[shard], begins[where].tolist(), ends[where].tolist())
            for i, blob in zip(where, blobs):
                out[i] = self._sample(int(rows[i]), int(shard), blob, ends[i] - begins[i], on_error)
        return out

    def _sample(self, row: int, shard: int, blob: bytes, expected: int, on_error: str) -> Sample:
        url = self.index.urls[shard]
        index = row - int(self.first_rows[shard])
        key = self.index.key(row)
        sample = Sample(row, self.index.names[shard], index, key, digest=google_crc32c.value(blob))
        try:
            if len(blob) != expected:
                raise EOFError(f"cut short ({len(blob)} of {expected} bytes)")
            raw = {"__key__": key}
            for name, regular, data in span_members(blob):
                member_key, ext = base_plus_ext(name)
                if skipped_member(name, member_key, regular):
                    continue
                if member_key != key:
                    raise EOFError(f"member {name} where the index has key {key}: the shard changed since it was "
                                   f"indexed")
                raw[ext.lower()] = data
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            if isinstance(e, StorageError) or on_error == "raise":
                raise CorpusError(f"shard {url}, key {key}: tar read error: {e}. Repair or remove the shard, "
                                  f"or pass --on-error skip") from e
            sample.error = f"tar read error: {e}"
            return sample
        try:
            sample.image, sample.captions, sample.meta = decode_sample(raw)
        except ValueError as e:
            if on_error == "raise":
                raise CorpusError(f"shard {url}, key {key}: {e}. Fix the sample, "
                                  f"or pass --on-error skip to record it as an invalid row") from e
            sample.error = str(e)
        return sample
