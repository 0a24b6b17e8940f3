"""kd-train on a corpus with broken samples: --on-error raise names the sample; skip leaves it out of its batch,
counts it, and moves no other sample."""
from __future__ import annotations

import json
import os
import re
import tarfile

import numpy as np
import pytest

from common.synth import make_sample, write_shard
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import cli, save_random_checkpoint, torchrun

STUDENT = "kd-test-student"


def broken_corpus(root):
    samples = [make_sample(0, "train", i, f"{i:09d}", image_size=32) for i in range(64)]
    samples[5]["jpg"] = b"not a jpeg"
    write_shard(root / "00000.tar", samples)
    return root


def test_on_error_raise_names_the_sample_and_an_option_that_exists(tmp_path):
    data = broken_corpus(tmp_path / "data")
    result = cli("stage2_student.cli", "--data", data, "--out", tmp_path / "run", "--student", STUDENT,
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
    cli("stage2_student.cli", "--data", data, "--out", root / "one", *SKIP_ARGS)
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
    result = cli("stage2_student.cli", "--data", data, "--out", run, "--student", STUDENT, "--losses", "task",
                 "--batch-size", "16", "--steps", "2", "--workers", "0", "--log-every", "1", "--on-error", "skip")
    lost = json.loads((run / "lost_samples.json").read_text())
    assert [(x["shard"], x["byte_offset"]) for x in lost] == [(str(damaged), damaged.stat().st_size)]
    assert 0 < lost[0]["samples_before"] < 64 and lost[0]["error"].startswith("truncated")
    assert f"shard {damaged} is damaged at byte {damaged.stat().st_size}" in result.stderr
    assert "its samples from there on are lost" in result.stderr
    assert "1 damaged shard(s) lost their samples after the damage" in result.stdout  # the summary line
    assert all(json.loads(line)["damaged_shards"] == 1 for line in (run / "metrics.jsonl").read_text().splitlines())
    ckpt = save_random_checkpoint("kd-test-teacher", tmp_path / "teacher.pt", seed=1)
    built = cli("stage1_teacher.cli", "build", "--teacher", "kd-test-teacher", "--pretrained", ckpt, "--data", data,
                "--out", tmp_path / "s.zarr", "--batch-size", 16, "--grad-batch", 16, "--chunk-rows", 16,
                "--workers", 0, "--on-error", "skip")
    assert f"shard {damaged} is damaged at byte {damaged.stat().st_size}" in built.stderr
    assert "1 damaged shard(s) lost their samples after the damage (corpus_errors)" in built.stderr


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


def test_a_shard_changed_in_place_is_refused_or_skipped_against_its_store(tmp_path):
    data = good_shards(tmp_path / "data", 2, 32)
    store = tmp_path / "s.zarr"
    ckpt = save_random_checkpoint("kd-test-teacher", tmp_path / "teacher.pt", seed=1)
    build_cache(BuildOptions(teacher="kd-test-teacher", pretrained=str(ckpt), data=str(data), out=str(store),
                             batch_size=16, grad_batch=16, chunk_rows=16, workers=0))
    changed = data / "00001.tar"
    reverse_captions_in_place(changed)
    args = ["--cache", store, "--data", data, "--student", STUDENT, "--losses", "task,fd", "--batch-size", "16",
            "--epochs", "1", "--workers", "0", "--log-every", "1", "--warmup", "1"]
    refused = cli("stage2_student.cli", "--out", tmp_path / "raise", *args, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert re.search(r"shard 00001\.tar, key 0000000\d\d: its bytes changed since cache .* was built", refused.stderr)
    assert "--on-error skip" in refused.stderr and not (tmp_path / "raise" / "open_clip_model.safetensors").exists()
    cli("stage2_student.cli", "--out", tmp_path / "skip", *args, "--on-error", "skip")
    metrics = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_samples"] == 32  # the changed shard's every sample, in one epoch
    evaluated = cli("evaluation.cli", "retrieval", "--cache", store, "--data", data, check=False)
    assert evaluated.returncode == 1 and "its bytes changed since cache" in evaluated.stderr
    assert "(32 such samples)" in evaluated.stderr and "Traceback" not in evaluated.stderr
    skipped = cli("evaluation.cli", "retrieval", "--cache", store, "--data", data, "--on-error", "skip")
    assert "32 images, 32 captions, 32 invalid samples dropped" in skipped.stdout
    other = save_random_checkpoint("kd-test-teacher", tmp_path / "other.pt", seed=2)
    added = cli("stage1_teacher.cli", "add-teacher", store, "--name", "b", "--teacher", "kd-test-teacher",
                "--pretrained", other, "--data", data, "--workers", 0, check=False)
    assert added.returncode == 1 and "sample_crc32c differs from the store's build" in added.stderr
