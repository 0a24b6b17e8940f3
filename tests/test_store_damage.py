"""A damaged store is an error naming the array and chunk, in every command; verify's full integrity pass;
int8 and gradient-free stores."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from common.cache import CacheError, CacheStore, dequantize
from common.corpus import Corpus
from evaluation.encode import cache_split
from stage1_teacher.build import BuildOptions, build_cache
from tests.helpers import STORE_OPTIONS, invoke

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"
SMALL = STORE_OPTIONS


@pytest.fixture()
def store(train_store, tmp_path) -> Path:
    """A copy of conftest's `train_store` (SMALL), to damage."""
    copy = tmp_path / "store.zarr"
    shutil.copytree(train_store, copy)
    return copy


def train(synth_corpus, store, out) -> object:
    return invoke("stage2_student.cli", "--cache", store, "--data", synth_corpus / "train", "--out", out,
                  "--student", STUDENT, "--losses", "task,fd,gd", "--batching", "cache", "--batch-size", "32",
                  "--steps", "2", "--workers", "0", "--warmup", "1", check=False)


def test_flipped_bytes_in_a_chunk_stop_training_naming_array_and_chunk(store, synth_corpus, tmp_path):
    chunk = store / "image_emb" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100:132] = bytes(b ^ 0xFF for b in data[100:132])  # one row's bytes
    chunk.write_bytes(bytes(data))
    result = train(synth_corpus, store, tmp_path / "run")
    assert result.returncode == 1 and "array image_emb, chunk 1 (rows 32..63) is damaged" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "open_clip_model.safetensors").exists()
    with pytest.raises(CacheError, match="image_emb, chunk 1"):
        CacheStore(str(store)).load("image_emb")


def test_a_missing_chunk_is_an_error_not_zeros(store, synth_corpus, tmp_path):
    (store / "text_grad" / "c" / "2" / "0").unlink()
    with pytest.raises(CacheError, match="array text_grad has 5 of its 6 chunk files"):
        CacheStore(str(store)).load("text_grad")
    result = train(synth_corpus, store, tmp_path / "run")
    assert result.returncode == 1 and "text_grad has 5 of its 6 chunk files" in result.stderr


def edit_attributes(store: Path, **changes) -> None:
    """Attributes changed in the store's zarr.json by hand, behind zarr's back."""
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


def test_edited_attributes_are_refused(store):
    edit_attributes(store, teacher_logit_scale=2 * CacheStore(str(store)).teacher_logit_scale)
    with pytest.raises(CacheError, match="attributes were changed after the build"):
        CacheStore(str(store))


def test_a_format_1_store_gets_a_clear_message(store):
    edit_attributes(store, format_version=1)
    with pytest.raises(CacheError, match="format version 1, this package reads 2: rebuild it"):
        CacheStore(str(store))


def test_verify_finds_damage_that_checksums_cannot(store, synth_corpus):
    """Values rewritten through zarr (so every checksum is valid): a row of norm 5188, 20 cleared valid flags."""
    group = zarr.open_group(str(store), mode="r+")
    group["text_emb"][7] = group["text_emb"][7] * 5188
    valid = group["valid"][...]
    valid[40:60] = False
    group["valid"][...] = valid
    result = invoke("stage1_teacher.cli", "verify", store, "--data", synth_corpus / "train", "--sample", "4",
                    check=False)
    assert result.returncode == 1
    assert "text_emb norms: 21 rows off" in result.stdout and "row 7, 40, 41" in result.stdout and "20 invalid rows, the attributes say 0" in result.stdout
    assert "not each in exactly one gradient batch" in result.stdout


def test_int8_store_without_gradients(synth_corpus, teacher_ckpt, train_store, tmp_path):
    out = tmp_path / "int8.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(teacher_ckpt), data=str(synth_corpus / "train"),
                             out=str(out), dtype="int8", grads=False, **SMALL))
    small, full = CacheStore(str(out)), CacheStore(str(train_store))
    assert not small.has("image_grad") and small.group["image_emb"].dtype == np.int8
    # int8 rows, re-normalised, stay within ~1% of the fp16 embeddings
    cos = np.sum(dequantize(small.load("image_emb")) * dequantize(full.load("image_emb")), axis=-1)
    assert cos.min() > 0.999
    corpus = Corpus.open(str(synth_corpus / "train"))
    a, b = cache_split(small, corpus), cache_split(full, corpus)
    assert np.allclose(a.image_emb @ a.text_emb.T, b.image_emb @ b.text_emb.T, atol=0.02)
    assert "gradients: not stored" in invoke("stage1_teacher.cli", "verify", out, "--data", synth_corpus / "train",
                                             "--sample", "4").stdout
    run = invoke("stage2_student.cli", "--cache", out, "--data", synth_corpus / "train", "--out", tmp_path / "run",
                 "--student", STUDENT, "--losses", "task,fd,gd", "--batch-size", "32", "--steps", "1", "--workers", "0",
                 "--warmup", "1")
    assert run.returncode == 0 and (tmp_path / "run" / "open_clip_model.safetensors").exists()
    refused = invoke("stage2_student.cli", "--cache", out, "--data", synth_corpus / "train", "--out", tmp_path / "r2",
                     "--student", STUDENT, "--losses", "gd", "--batching", "cache", "--batch-size", "32",
                     "--steps", "1", "--workers", "0", check=False)
    assert refused.returncode == 1 and "grad" in refused.stderr


def every_command(store, synth_corpus, run) -> list:
    """kd-train, kd-eval from the store, and kd-cache verify, on `store`."""
    return [train(synth_corpus, store, run),
            invoke("evaluation.cli", "retrieval", "--cache", store, "--data", synth_corpus / "train", check=False),
            invoke("stage1_teacher.cli", "verify", store, "--data", synth_corpus / "train", "--sample", "4",
                   check=False)]


def test_a_damaged_index_chunk_names_store_array_and_chunk_in_every_command(store, synth_corpus, tmp_path):
    chunk = store / "index" / "offsets" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0x01
    chunk.write_bytes(bytes(data))
    said = (f"cache {store}: its corpus index is damaged: array index/offsets, chunk 0 (rows 0..191) is damaged "
            f"(Stored and computed checksum do not match")
    for result in every_command(store, synth_corpus, tmp_path / "run"):
        assert result.returncode == 1 and said in result.stderr, result.stderr[-2000:]
        assert "rebuild the store with `kd-cache build --overwrite`" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "open_clip_model.safetensors").exists()


def test_edited_array_metadata_is_refused_in_every_command(store, synth_corpus, tmp_path):
    meta_path = store / "image_emb" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 100  # of 192 rows
    meta_path.write_text(json.dumps(meta))
    said = (f"cache {store}: array image_emb has shape (100, 48), chunks (32, 48), dtype float16, where its build "
            f"makes (192, 48), (32, 48), float16: its zarr.json was edited or damaged")
    for result in every_command(store, synth_corpus, tmp_path / "run"):
        assert result.returncode == 1 and said in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "broadcast" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "open_clip_model.safetensors").exists()


def test_edited_completion_attributes_are_refused(store):
    edit_attributes(store, invalid_count=7)
    with pytest.raises(CacheError, match="attributes were changed after the build finished .*invalid_count"):
        CacheStore(str(store))


def test_a_store_finished_before_digests_and_its_seal_still_trains_with_a_warning(store, synth_corpus, tmp_path):
    group = zarr.open_group(str(store), mode="r+")
    del group["sample_crc32c"]
    del group.attrs["complete_hash"]
    result = train(synth_corpus, store, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cache {store} predates sample digests" in result.stderr and "rebuild the cache" in result.stderr
