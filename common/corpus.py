"""The one corpus reader: webdataset shards (img2dataset layout) -> samples that carry their identity.

A corpus is a list of tar shards. `Corpus.open(spec)` indexes the shards once (tar headers only, grouped into
samples by webdataset's key rule: keys, and where each member's bytes lie), which fixes the row of every sample:
rows follow shard order, then order inside the shard. Rows never shift: a sample that cannot be decoded still has
its row (marked invalid).

Reading a sample is a seek and a read per member from that index: any row or row range is read without parsing
the tar again (build blocks, resume, rank splits, the training loader's shuffled rows).
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from common.decode import decode_sample

ON_ERROR_CHOICES = ("raise", "skip")


class CorpusError(ValueError):
    """A shard spec, shard or sample that cannot be read, naming the shard and key at fault."""


def expand_spec(spec: str | Sequence[str]) -> list[Path]:
    """Shard paths from a spec: brace patterns (`shards/{00000..00099}.tar`), directories (their *.tar, sorted),
    files, lists of any of these (a Python list or '::'-separated, as webdataset writes them)."""
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    parts = [p for part in parts for p in str(part).split("::") if p]
    paths: list[Path] = []
    for part in parts:
        for item in braceexpand.braceexpand(part):
            path = Path(item)
            if path.is_dir():
                found = sorted(path.glob("*.tar"))
                if not found:
                    raise CorpusError(f"data spec {part!r}: directory {path} holds no .tar shard")
                paths.extend(found)
            elif path.is_file():
                paths.append(path)
            else:
                raise CorpusError(f"data spec {part!r}: shard {path} does not exist")
    if not paths:
        raise CorpusError(f"data spec {spec!r} matches no shard")
    if len(set(paths)) != len(paths):
        raise CorpusError(f"data spec {spec!r} names a shard twice")
    return paths


@dataclass(frozen=True)
class ShardIndex:
    """One shard's samples in order: keys, and for each sample its members as (extension, data offset, size)."""
    path: str
    name: str
    size: int
    keys: tuple[str, ...]
    members: tuple[tuple[tuple[str, int, int], ...], ...]
    error: str | None = None  # set when the tar is corrupt: samples after the damage are not indexed

    @staticmethod
    def scan(path: Path) -> "ShardIndex":
        keys: list[str] = []
        members: list[list[tuple[str, int, int]]] = []
        error = None
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if not member.isreg() or key is None or os.path.basename(member.name).startswith("__"):
                        continue
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        members.append([])
                    members[-1].append((ext.lower(), member.offset_data, member.size))
        except (tarfile.TarError, EOFError, OSError) as e:
            error = f"corrupt tar after {len(keys)} samples: {e}"
        return ShardIndex(str(path), path.name, path.stat().st_size, tuple(keys),
                          tuple(tuple(m) for m in members), error)


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

    @property
    def caption(self) -> str:
        """The caption that training and the cache use: the first line of the .txt."""
        return self.captions[0]


class Corpus:
    """Indexed shards with a fixed row for every sample."""

    def __init__(self, shards: list[ShardIndex], spec: str = ""):
        self.spec = spec
        self.shards = shards
        counts = np.array([len(s.keys) for s in shards], dtype=np.int64)
        self.first_rows = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.counts = counts
        self.num_samples = int(counts.sum())

    @classmethod
    def open(cls, spec: str | Sequence[str], on_error: str = "raise") -> "Corpus":
        if on_error not in ON_ERROR_CHOICES:
            raise CorpusError(f"--on-error {on_error!r}: choose one of {ON_ERROR_CHOICES}")
        shards = [ShardIndex.scan(p) for p in expand_spec(spec)]
        for shard in shards:
            if shard.error and on_error == "raise":
                raise CorpusError(f"shard {shard.path}: {shard.error}. Repair or remove the shard, "
                                  f"or pass --on-error skip to use the samples before the damage")
        names = [s.name for s in shards]
        if len(set(names)) != len(names):  # shard identity is its file name (provenance survives moving data)
            raise CorpusError(f"data spec {spec!r}: two shards share a file name; give each shard a unique name")
        corpus = cls(shards, spec if isinstance(spec, str) else "::".join(map(str, spec)))
        if corpus.num_samples == 0:
            raise CorpusError(f"data spec {spec!r}: the shards hold no sample")
        return corpus

    @property
    def keys(self) -> np.ndarray:
        return np.array([k for s in self.shards for k in s.keys], dtype=object)

    @property
    def errors(self) -> list[str]:
        return [f"{s.path}: {s.error}" for s in self.shards if s.error]

    def description(self) -> dict:
        """What identifies the corpus for provenance: shard names, byte sizes and sample counts."""
        return {
            "num_samples": self.num_samples,
            "shards": [{"name": s.name, "size": s.size, "count": len(s.keys)} for s in self.shards],
        }

    def locate(self, row: int) -> tuple[int, int]:
        """(shard number, index in shard) of a row."""
        shard = int(np.searchsorted(self.first_rows, row, side="right") - 1)
        return shard, row - int(self.first_rows[shard])

    def read(self, start: int = 0, stop: int | None = None, on_error: str = "raise") -> Iterator[Sample]:
        """Samples of rows [start, stop) in row order. A bad sample raises CorpusError naming shard and key, or,
        with on_error='skip', comes back with `error` set and no image."""
        stop = self.num_samples if stop is None else stop
        row = start
        while row < stop:
            shard_no, index = self.locate(row)
            shard = self.shards[shard_no]
            n = min(stop - row, len(shard.keys) - index)
            yield from self._read_shard(shard, int(self.first_rows[shard_no]), index, index + n, on_error)
            row += n

    def _read_shard(self, shard: ShardIndex, first_row: int, begin: int, end: int, on_error: str) -> Iterator[Sample]:
        with open(shard.path, "rb") as stream:
            for index in range(begin, end):
                key = shard.keys[index]
                try:
                    raw = {"__key__": key}
                    for ext, offset, size in shard.members[index]:
                        stream.seek(offset)
                        raw[ext] = stream.read(size)
                        if len(raw[ext]) != size:
                            raise EOFError(f"{key}.{ext} is cut short ({len(raw[ext])} of {size} bytes)")
                except (OSError, EOFError) as e:
                    if on_error == "raise":
                        raise CorpusError(f"shard {shard.path}, key {key}: tar read error: {e}. Repair or remove "
                                          f"the shard, or pass --on-error skip") from e
                    yield Sample(first_row + index, shard.name, index, key, error=f"tar read error: {e}")
                    continue
                yield self._decoded(shard, first_row, index, key, raw, on_error)

    @staticmethod
    def _decoded(shard: ShardIndex, first_row: int, index: int, key: str, raw: dict, on_error: str) -> Sample:
        sample = Sample(first_row + index, shard.name, index, key)
        try:
            sample.image, sample.captions, sample.meta = decode_sample(raw)
        except ValueError as e:
            if on_error == "raise":
                raise CorpusError(f"shard {shard.path}, key {key}: {e}. Fix the sample, "
                                  f"or pass --on-error skip to record it as an invalid row") from e
            sample.error = str(e)
        return sample
