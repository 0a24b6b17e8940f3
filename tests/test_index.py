"""The corpus index: built once, reused from the sidecar or the store, re-scanned when a shard changes, compact,
and loud about damaged tar framing."""
from __future__ import annotations

import io
import logging
import os
import tarfile

import numpy as np
import pytest
import zarr

from common.cache import CacheStore
from common.corpus import Corpus, CorpusError, as_spec, expand_spec
from common.index import scan_shard, sidecar_url
from common.storage import stat_many
from common.synth import make_sample, write_shard
from stage1_teacher.build import BuildOptions, build_cache
from tests.helpers import invoke, plain_keys, save_random_checkpoint

TEACHER = "kd-test-teacher"


def indexed_shards(caplog) -> int:
    """Shards the last Corpus.open scanned, from its log line (0 when it reused an index)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("indexed ")]
    return int(lines[-1].split()[1]) if lines else 0


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "shards"
    for shard in range(3):
        write_shard(root / f"{shard:05d}.tar",
                    [make_sample(0, "train", i, f"{i:09d}", image_size=16) for i in range(shard * 20, shard * 20 + 20)])
    return root


def test_index_is_built_once_and_reused_until_a_shard_changes(shards, caplog):
    caplog.set_level(logging.INFO)
    first = Corpus.open(str(shards))
    assert indexed_shards(caplog) == 3 and os.path.isdir(sidecar_url(first.index.urls))
    caplog.clear()
    again = Corpus.open(str(shards))
    assert indexed_shards(caplog) == 0  # loaded from the sidecar
    assert again.description() == first.description() and list(again.keys) == list(first.keys)
    # a shard rewritten with other samples: only it is scanned again, and the new samples are what is read
    write_shard(shards / "00001.tar", [make_sample(1, "train", i, f"x{i:08d}", image_size=16) for i in range(25)])
    caplog.clear()
    changed = Corpus.open(str(shards))
    assert indexed_shards(caplog) == 1 and changed.num_samples == 65
    assert [s.key for s in changed.read(20, 22)] == ["x00000000", "x00000001"]


def test_index_costs_bytes_not_objects(shards):
    corpus = Corpus.open(str(shards))
    index = corpus.index
    assert all(isinstance(a, np.ndarray) for a in (index.offsets, index.key_ends, index.key_bytes))
    # 8 (offset) + 8 (key end) + 9 (img2dataset's 9-digit key) bytes per sample
    assert index.nbytes / corpus.num_samples == 25


def test_build_keeps_the_index_and_later_opens_use_it(shards, tmp_path, caplog):
    ckpt = save_random_checkpoint(TEACHER, tmp_path / "t.pt", seed=1)
    out = tmp_path / "s.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpt), data=str(shards), out=str(out), batch_size=16,
                             grad_batch=8, chunk_rows=16, workers=0))
    group = zarr.open_group(str(out), mode="r")
    assert plain_keys(group) == [f"{i:09d}" for i in range(60)]
    caplog.set_level(logging.INFO)
    os.environ["KD_CACHE_DIR"], saved = str(tmp_path / "empty_cache_dir"), os.environ["KD_CACHE_DIR"]
    try:  # no sidecar: the store's index serves
        caplog.clear()
        corpus = Corpus.open(str(shards), known=[CacheStore(str(out)).index()])
        assert indexed_shards(caplog) == 0 and corpus.num_samples == 60
    finally:
        os.environ["KD_CACHE_DIR"] = saved


def test_shard_directories_sort_naturally(tmp_path):
    for n in (10, 2, 1):
        write_shard(tmp_path / f"{n}.tar", [make_sample(0, "train", n, f"{n:09d}", image_size=16)])
    assert [os.path.basename(u) for u in expand_spec(str(tmp_path))] == ["1.tar", "2.tar", "10.tar"]


def test_as_spec_gives_a_data_value_naming_the_same_shards(tmp_path):
    for n in range(8, 12):
        write_shard(tmp_path / f"{n:05d}.tar", [make_sample(0, "train", n, f"{n:09d}", image_size=16)])
    urls = expand_spec(str(tmp_path))
    assert as_spec(urls) == f"{tmp_path}/{{00008..00011}}.tar" and expand_spec(as_spec(urls)) == urls
    assert as_spec(urls[:1]) == urls[0]
    gap = [urls[0], urls[2]]  # not in a row: the list itself
    assert as_spec(gap) == "::".join(gap) and expand_spec(as_spec(gap)) == gap


def overwrite_header(path, member: str) -> None:
    """Replace the 512-byte tar header of `member` with garbage (the data stays)."""
    with tarfile.open(path) as tar:
        offset = next(m.offset for m in tar if m.name == member)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * 2)


def test_a_damaged_tar_header_is_an_error_not_fewer_samples(tmp_path):
    """Python's tarfile takes a bad header for the end of the archive; the index must not."""
    path = tmp_path / "00000.tar"
    write_shard(path, [make_sample(0, "train", i, f"{i:09d}", image_size=16) for i in range(20)])
    with tarfile.open(path) as tar:  # the header of sample 10's first member, in PAX format its extended header
        victim = [m for m in tar if m.name.startswith("000000010.")][0].name
    overwrite_header(path, victim)
    scan = scan_shard(str(path), path.name, stat_many([str(path)])[0])
    assert "damaged tar header" in scan.error and scan.count == 10
    with pytest.raises(CorpusError, match=r"00000\.tar: damaged tar header.*--on-error skip"):
        Corpus.open(str(path))
    kept = Corpus.open(str(path), on_error="skip")
    assert kept.num_samples == 10 and kept.errors and "damaged" in kept.errors[0]


def test_a_truncated_shard_is_an_error(tmp_path):
    path = tmp_path / "00000.tar"
    write_shard(path, [make_sample(0, "train", i, f"{i:09d}", image_size=16) for i in range(20)])
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusError, match=r"00000\.tar: (truncated|corrupt)"):
        Corpus.open(str(path))


def test_pax_and_long_names_index_like_webdataset(tmp_path):
    """Names over 100 bytes need pax or GNU long-name headers: the index falls back to tarfile and agrees with
    webdataset's own grouping."""
    import webdataset as wds
    long_key = "d" * 120 + "/000000001"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for key in ("000000000", long_key, "000000002"):
                for ext in ("jpg", "txt"):
                    data = make_sample(0, "train", 0, key, image_size=16)[ext]
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        corpus = Corpus.open(str(path))
        expected = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
        assert list(corpus.keys) == expected == ["000000000", long_key, "000000002"]
        assert corpus.read_rows([1])[0].key == long_key


def flip_offsets_chunk(sidecar: str) -> None:
    chunk = f"{sidecar}/offsets/c/0"
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(chunk, "wb").write(bytes(data))


def without_checksums(sidecar: str) -> None:
    """The sidecar as kd-train wrote it before sidecars had checksums: the same arrays, no codec."""
    group = zarr.open_group(sidecar, mode="r+")
    for name, array in list(group.arrays()):
        values = array[...]
        group.create_array(name, shape=values.shape, dtype=array.dtype, chunks=array.chunks, overwrite=True,
                           compressors=None)[...] = values


def a_missing_chunk(sidecar: str) -> None:
    os.remove(f"{sidecar}/errors/c/0")  # read back, it would be the fill value: no shard damage


def broken_metadata(sidecar: str) -> None:
    with open(f"{sidecar}/key_ends/zarr.json", "w") as f:
        f.write("{")


@pytest.mark.parametrize("damage, said", [(flip_offsets_chunk, "Stored and computed checksum do not match"),
                                          (without_checksums, "have no checksums (written by an older version)"),
                                          (a_missing_chunk, "array errors has 0 of its 1 chunk files"),
                                          (broken_metadata, "")])
def test_a_damaged_or_unchecked_sidecar_is_rebuilt_with_a_warning(shards, tmp_path, caplog, damage, said):
    Corpus.open(str(shards))
    sidecar = sidecar_url(expand_spec(str(shards)))
    damage(sidecar)
    result = invoke("stage2_student.cli", "--data", shards, "--out", tmp_path / "run", "--student", "kd-test-student",
                    "--losses", "task", "--batch-size", "16", "--steps", "1", "--workers", "0", check=False)
    assert result.returncode == 0, result.stderr[-2000:]  # no healthy shard is blamed
    assert f"corpus index sidecar {sidecar} is damaged or unreadable" in result.stderr and said in result.stderr
    assert "indexing its shards again" in result.stderr and "indexed 3 of 3 shards" in result.stderr
    caplog.clear()  # the run's own records (it runs in this process)
    caplog.set_level(logging.INFO)
    Corpus.open(str(shards))
    assert indexed_shards(caplog) == 0 and "sidecar" not in caplog.text  # rewritten, intact
