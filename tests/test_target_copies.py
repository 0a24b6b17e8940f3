"""Node-local target copies ($KD_CACHE_DIR/targets, under torchrun): checked at every open, rebuilt from the store
when damaged, truncated or unchecked; nothing wrong is trained on. Real stores, real copies, real torchrun."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from common.cache import CacheStore
from common.storage import cache_dir
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.targets import checksums_path, node_local_copy
from tests.helpers import save_random_checkpoint, torchrun

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"


@pytest.fixture(scope="module")
def store(synth_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("target_copies")
    ckpt = save_random_checkpoint(TEACHER, root / "teacher.pt", seed=21)  # a store (and copy names) of its own
    out = root / "store.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpt), data=str(synth_corpus / "train"), out=str(out),
                             batch_size=32, grad_batch=32, chunk_rows=32, workers=0))
    return out


def copy_of(store: Path, name: str) -> Path:
    return cache_dir() / "targets" / f"{CacheStore(str(store)).attrs['content_hash'][:32]}-{name}.npy"


def losses(out: Path) -> list[float]:
    return [json.loads(line)["fd"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_damaged_copy_is_rebuilt_and_never_trained_on(synth_corpus, store, tmp_path):
    def two_ranks(out: Path):
        return torchrun("stage2_student.cli", "--cache", store, "--data", synth_corpus / "train", "--out", out,
                        "--student", STUDENT, "--losses", "task,fd", "--batch-size", "32", "--steps", "2",
                        "--workers", "0", "--log-every", "1", "--warmup", "1")
    first = two_ranks(tmp_path / "first")
    assert "memory-mapped from this node's copy in" in first.stderr and "in memory" not in first.stderr
    copy = np.load(copy_of(store, "image_emb"), mmap_mode="r+")
    copy[:, 0] = -copy[:, 0]  # one column negated: every fd loss changed on main
    copy.flush()
    del copy
    second = two_ranks(tmp_path / "second")
    assert f"node-local target copy {copy_of(store, 'image_emb')} is damaged: 6 of its 6 blocks" in second.stderr
    assert "rebuilding it from the store" in second.stderr
    assert losses(tmp_path / "second") == losses(tmp_path / "first")
    np.testing.assert_array_equal(np.load(copy_of(store, "image_emb")), CacheStore(str(store)).load("image_emb"))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, said", [
    (flip_a_byte, "is damaged: 1 of its 6 blocks fail their checksums (the first: rows 160..191)"),
    (truncate, "cannot be read (mmap length is greater than file size)"),
    (lambda path: checksums_path(path).unlink(), "has no checksums (written by an older version)"),
    (lambda path: checksums_path(path).write_text("{"), "has unreadable checksums"),
])
def test_each_damage_to_a_copy_is_found_and_repaired(store, caplog, damage, said):
    caplog.set_level(logging.WARNING, logger="kd-train")
    cache = CacheStore(str(store))
    node_local_copy(cache, "text_emb")
    path = copy_of(store, "text_emb")
    damage(path)
    repaired = node_local_copy(cache, "text_emb")
    assert f"node-local target copy {path} {said}" in caplog.text and "rebuilding it from the store" in caplog.text
    np.testing.assert_array_equal(repaired, cache.load("text_emb"))
    caplog.clear()
    node_local_copy(cache, "text_emb")
    assert caplog.text == ""  # intact now: opened without a word
