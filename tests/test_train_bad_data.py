"""kd-train on a corpus with broken samples: --on-error raise names the sample; skip leaves it out of its batch,
counts it, and moves no other sample."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from common.cache import CacheStore
from common.corpus import Corpus, CorpusError
from common.synth import make_sample, write_shard
from evaluation.encode import cache_split
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import STORE_TEACHER, invoke, save_random_checkpoint, torchrun

STUDENT = "kd-test-student"


def broken_corpus(root):
    samples = [make_sample(0, "train", i, f"{i:09d}", image_size=32) for i in range(64)]
    samples[5]["jpg"] = b"not a jpeg"
    write_shard(root / "00000.tar", samples)
    return root


def test_on_error_raise_names_the_sample_and_an_option_that_exists(tmp_path):
    data = broken_corpus(tmp_path / "data")
    result = invoke("stage2_student.cli", "--data", data, "--out", tmp_path / "run", "--student", STUDENT,
                    "--losses", "task", "--batch-size", "16", "--epochs", "1", "--workers", "0", check=False)
    assert result.returncode == 1 and "key 000000005: undecodable image" in result.stderr
    assert "--on-error skip" in result.stderr and "Traceback" not in result.stderr


SKIP_ARGS = ["--student", STUDENT, "--losses", "task", "--batch-size", "16", "--epochs", "1", "--workers", "0",
             "--log-every", "1", "--on-error", "skip", "--warmup", "1"]


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory) -> tuple:
    """The broken corpus and one single-process `kd-train --on-error skip` epoch over it (read-only)."""
    root = tmp_path_factory.mktemp("skip_run")
    data = broken_corpus(root / "data")
    invoke("stage2_student.cli", "--data", data, "--out", root / "one", *SKIP_ARGS)
    return data, root / "one"


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_on_error_skip_leaves_the_sample_out_and_counts_it(skip_run, tmp_path):
    data, run = skip_run
    metrics = read_metrics(run)
    assert len(metrics) == 4 and metrics[-1]["skipped_samples"] == 1  # one epoch: the sample was drawn once
    trainer = Trainer(TrainOptions(data=str(data), out=str(tmp_path / "direct"), student=STUDENT, losses="task",
                                   batch_size=16, epochs=1, workers=0, on_error="skip"))
    planned = trainer.order.micro_batches(0)
    step = int(np.flatnonzero((planned == 5).any(axis=1))[0])
    batch = trainer.loader(0, 0).dataset[0, step]
    assert batch["rows"].tolist() == [r for r in planned[step].tolist() if r != 5]  # the others, in their order
    assert len(batch["skipped"]) == 1 and "000000005" in batch["skipped"][0]
    assert batch["student_images"].shape[0] == 15


def test_two_ranks_with_a_skipped_sample_give_the_single_process_losses(skip_run, tmp_path):
    """A rank whose part of the batch lost a sample gathers fewer rows than the other: the global batch, and so
    every loss, is the single process's."""
    data, single = skip_run
    torchrun("stage2_student.cli", "--data", data, "--out", tmp_path / "two", *SKIP_ARGS)
    one, two = read_metrics(single), read_metrics(tmp_path / "two")
    assert two[-1]["skipped_samples"] == 1
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-4)


def good_shards(data, shards: int, per_shard: int):
    for shard in range(shards):
        write_shard(data / f"{shard:05d}.tar", [make_sample(0, "train", i, f"{i:09d}", image_size=32)
                                                 for i in range(shard * per_shard, (shard + 1) * per_shard)])
    return data


def test_a_truncated_shard_under_skip_counts_what_it_lost(tmp_path):
    data = good_shards(tmp_path / "data", 3, 64)
    damaged = data / "00001.tar"
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    run = tmp_path / "run"
    result = invoke("stage2_student.cli", "--data", data, "--out", run, "--student", STUDENT, "--losses", "task",
                    "--batch-size", "16", "--steps", "2", "--workers", "0", "--log-every", "1", "--on-error", "skip")
    lost = json.loads((run / "lost_samples.json").read_text())
    assert [(x["shard"], x["byte_offset"]) for x in lost] == [(str(damaged), damaged.stat().st_size)]
    assert 0 < lost[0]["samples_before"] < 64 and lost[0]["error"].startswith("truncated")
    assert f"shard {damaged} is damaged at byte {damaged.stat().st_size}" in result.stderr
    assert "its samples from there on are lost" in result.stderr
    assert "1 damaged shard(s) lost their samples after the damage" in result.stdout  # the summary line
    assert all(json.loads(line)["damaged_shards"] == 1 for line in (run / "metrics.jsonl").read_text().splitlines())
    ckpt = save_random_checkpoint("kd-test-teacher", tmp_path / "teacher.pt", seed=1)
    built = invoke("stage1_teacher.cli", "build", "--teacher", "kd-test-teacher", "--pretrained", ckpt, "--data", data,
                   "--out", tmp_path / "s.zarr", "--batch-size", 16, "--grad-batch", 16, "--chunk-rows", 16,
                   "--workers", 0, "--on-error", "skip")
    assert f"shard {damaged} is damaged at byte {damaged.stat().st_size}" in built.stderr
    assert "1 damaged shard(s) lost their samples after the damage (corpus_errors)" in built.stderr


def whole_samples_before(shard_bytes: bytes, cut: int) -> int:
    """Samples of a tar whose every member (data padded to its 512-byte block) lies before byte `cut`."""
    ends: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(shard_bytes)) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + -(-member.size // 512) * 512)
    return sum(end <= cut for end in ends.values())


def store_of(data, teacher_ckpt, out):
    """conftest's teacher's store of `data`, built while its shards are intact."""
    build_cache(BuildOptions(teacher=STORE_TEACHER, pretrained=str(teacher_ckpt), data=str(data), out=str(out),
                             batch_size=16, grad_batch=16, chunk_rows=16, workers=0))
    return out


def test_a_shard_truncated_after_the_build_trains_on_what_the_cache_knows_it_kept(teacher_ckpt, tmp_path):
    data = good_shards(tmp_path / "data", 3, 32)
    store = store_of(data, teacher_ckpt, tmp_path / "s.zarr")
    damaged = data / "00001.tar"
    intact_bytes = damaged.read_bytes()
    cut = len(intact_bytes) // 2 + 700  # inside a sample: its first members are there, not the rest
    damaged.write_bytes(intact_bytes[:cut])
    kept = whole_samples_before(intact_bytes, cut)
    assert 0 < kept < 32
    opts = dict(cache=str(store), data=str(data), student=STUDENT, losses="task,fd", batch_size=16, epochs=1,
                workers=0, log_every=1, warmup=1)
    with pytest.raises(CorpusError, match=rf"shard {re.escape(str(damaged))}: truncated.*--on-error skip"):
        Trainer(TrainOptions(out=str(tmp_path / "raise"), **opts))
    trainer = Trainer(TrainOptions(out=str(tmp_path / "skip"), on_error="skip", **opts))
    trainer.run()
    lost = json.loads((tmp_path / "skip" / "lost_samples.json").read_text())
    assert [(x["shard"], x["samples_before"], x["samples_lost"]) for x in lost] == [(str(damaged), kept, 32 - kept)]
    assert f"1 damaged shard(s) lost {32 - kept} samples after the damage, 0 unreadable" in trainer.summary
    trained = np.unique(trainer.order.micro_batches(0))
    assert trainer.usable.sum() == 64 + kept and set(trained) <= set(np.flatnonzero(trainer.usable))
    assert trainer.corpus.counts[1] == kept + 1 and 32 + kept not in trained  # the sample the cut went through
    metrics = read_metrics(tmp_path / "skip")
    assert len(metrics) == (64 + kept) // 16 and metrics[-1]["skipped_samples"] == 0
    # evaluation from the cache keeps the same samples
    corpus = Corpus.open(str(data), on_error="skip", known=[CacheStore(str(store)).index()])
    assert cache_split(CacheStore(str(store)), corpus, on_error="skip").image_emb.shape[0] == 64 + kept


def reverse_captions_in_place(shard) -> None:
    """Every .txt member's bytes reversed where they lie: the same name, size, keys and (restored) mtime."""
    stat = os.stat(shard)
    with tarfile.open(shard) as tar:
        spans = [(m.offset_data, m.size) for m in tar if m.name.endswith(".txt")]
    data = bytearray(shard.read_bytes())
    for start, size in spans:
        data[start:start + size] = data[start:start + size][::-1]
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_shard_changed_in_place_is_refused_or_skipped_against_its_store(teacher_ckpt, tmp_path):
    data = good_shards(tmp_path / "data", 2, 32)
    store = store_of(data, teacher_ckpt, tmp_path / "s.zarr")
    changed = data / "00001.tar"
    reverse_captions_in_place(changed)
    args = ["--cache", store, "--data", data, "--student", STUDENT, "--losses", "task,fd", "--batch-size", "16",
            "--epochs", "1", "--workers", "0", "--log-every", "1", "--warmup", "1"]
    refused = invoke("stage2_student.cli", "--out", tmp_path / "raise", *args, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert re.search(r"shard 00001\.tar, key 0000000\d\d: its bytes changed since cache .* was built", refused.stderr)
    assert "--on-error skip" in refused.stderr and not (tmp_path / "raise" / "open_clip_model.safetensors").exists()
    invoke("stage2_student.cli", "--out", tmp_path / "skip", *args, "--on-error", "skip")
    metrics = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_samples"] == 32  # the changed shard's every sample, in one epoch
    evaluated = invoke("evaluation.cli", "retrieval", "--cache", store, "--data", data, check=False)
    assert evaluated.returncode == 1 and "its bytes changed since cache" in evaluated.stderr
    assert "(32 such samples)" in evaluated.stderr and "Traceback" not in evaluated.stderr
    skipped = invoke("evaluation.cli", "retrieval", "--cache", store, "--data", data, "--on-error", "skip")
    assert "32 images, 32 captions, 32 invalid samples dropped" in skipped.stdout
    other = save_random_checkpoint("kd-test-teacher", tmp_path / "other.pt", seed=2)
    added = invoke("stage1_teacher.cli", "add-teacher", store, "--name", "b", "--teacher", "kd-test-teacher",
                   "--pretrained", other, "--data", data, "--workers", 0, check=False)
    assert added.returncode == 1 and "sample_crc32c differs from the store's build" in added.stderr
