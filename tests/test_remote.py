"""Shards and stores on object storage (a real S3 endpoint on localhost), `pipe:` shards, and multi-node torchrun."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from common.corpus import Corpus
from tests.helpers import REPO, assert_stores_equal, cli, invoke

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"
# conftest's STORE_OPTIONS: `train_store` is the local build
BUILD = ["--batch-size", "16", "--grad-batch", "32", "--chunk-rows", "32", "--window-blocks", "2", "--workers", "0"]
TRAIN = ["--student", STUDENT, "--losses", "task,fd,icl,crd,gd", "--batch-size", "32", "--steps", "1",
         "--log-every", "1", "--workers", "0", "--warmup", "1"]


@pytest.fixture(scope="module")
def remote_train(s3, synth_corpus) -> str:
    """The synthetic train shards uploaded to s3://kd-test/train/."""
    fs = fsspec.filesystem("s3")
    for shard in sorted((synth_corpus / "train").glob("*.tar")):
        fs.put(str(shard), f"{s3[len('s3://'):]}/train/{shard.name}")
    return f"{s3}/train"


@pytest.fixture(scope="module")
def local_store(train_store) -> Path:
    """conftest's `train_store`: `teacher_ckpt`'s local build with BUILD's options."""
    return train_store


@pytest.fixture(scope="module")
def local_run(local_store, synth_corpus, tmp_path_factory) -> Path:
    """The reference run: kd-train from the local store on the local shards (what the remote runs must equal)."""
    out = tmp_path_factory.mktemp("remote_ref") / "local-run"
    invoke("stage2_student.cli", "--cache", local_store, "--data", synth_corpus / "train", "--out", out, *TRAIN)
    return out


def first_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def assert_same_step0(a: Path, b: Path) -> None:
    one, two = first_metrics(a), first_metrics(b)
    for key in ("loss", "task", "fd", "icl", "crd", "gd"):
        assert one[key] == pytest.approx(two[key], rel=1e-4), key


def test_remote_corpus_reads_the_same_samples(remote_train, synth_corpus):
    local, remote = Corpus.open(str(synth_corpus / "train")), Corpus.open(remote_train)
    assert remote.description() == local.description()
    assert remote.index.urls[0] == f"{remote_train}/00000.tar"
    rows = np.array([150, 3, 70, 71])
    for a, b in zip(local.read_rows(rows), remote.read_rows(rows)):
        assert (a.key, a.captions) == (b.key, b.captions) and a.image.tobytes() == b.image.tobytes()
    assert [s.key for s in remote.read(60, 70)] == list(local.keys[60:70])  # ranged read across a shard border


def test_https_style_shards_read_with_ranged_requests(remote_train, synth_corpus):
    """Plain HTTP(S) URLs (here the S3 endpoint's public path-style URLs): HEAD for size, ranged GETs for rows."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    bucket_path = remote_train[len("s3://"):]
    fs = fsspec.filesystem("s3")
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        fs.chmod(f"{bucket_path}/{name}", acl="public-read")  # readable without credentials, as on the web
    web = Corpus.open(f"{endpoint}/{bucket_path}/{{00000..00002}}.tar")
    local = Corpus.open(str(synth_corpus / "train"))
    assert web.description() == local.description()
    a, b = web.read_rows([130])[0], local.read_rows([130])[0]
    assert a.key == b.key and a.image.tobytes() == b.image.tobytes()


def test_build_train_eval_on_object_storage(remote_train, s3, local_store, local_run, teacher_ckpt, tmp_path):
    """Shards and store on S3 through the CLIs: the store equals a local build, verify passes, training from it
    gives the local run's step-0 losses, and kd-eval reads it."""
    store = f"{s3}/stores/remote.zarr"
    invoke("stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", teacher_ckpt, "--data", remote_train,
           "--out", store, *BUILD)
    assert_stores_equal(local_store, store)
    report = invoke("stage1_teacher.cli", "verify", store, "--data", remote_train, "--sample", "8")
    assert "OK" in report.stdout and "integrity" in report.stdout
    assert "bytes per sample" in invoke("stage1_teacher.cli", "info", store).stdout
    invoke("stage2_student.cli", "--cache", store, "--data", remote_train, "--out", tmp_path / "remote", *TRAIN)
    assert_same_step0(tmp_path / "remote", local_run)
    result = invoke("evaluation.cli", "retrieval", "--cache", store, "--data", remote_train,
                    "--output", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"], result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(module: str, *args) -> None:
    """`torchrun --nnodes 2` as two launchers (one process each) meeting at a c10d rendezvous on localhost."""
    endpoint = f"127.0.0.1:{free_port()}"
    launch = lambda node: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "kd-test", "-m", module,
         *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    nodes = [launch(0), launch(1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


def test_two_nodes_on_object_storage(remote_train, s3, local_store, local_run, teacher_ckpt, tmp_path):
    store = f"{s3}/stores/two-nodes.zarr"
    two_nodes("stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", teacher_ckpt, "--data",
              remote_train, "--out", store, *BUILD)
    assert_stores_equal(local_store, store)
    two_nodes("stage2_student.cli", "--cache", store, "--data", remote_train, "--out", tmp_path / "two", *TRAIN)
    assert_same_step0(tmp_path / "two", local_run)


def test_pipe_shards_read_like_files(synth_corpus):
    shards = sorted((synth_corpus / "train").glob("*.tar"))
    piped = Corpus.open("::".join(f"pipe:cat {s}" for s in shards))
    local = Corpus.open(str(synth_corpus / "train"))
    assert piped.description() == local.description()
    a, b = piped.read_rows([100])[0], local.read_rows([100])[0]
    assert a.key == b.key and a.image.tobytes() == b.image.tobytes()


def test_remote_failures_are_one_line(remote_train, s3, teacher_ckpt, tmp_path):
    build = ["stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", teacher_ckpt,
             "--out", tmp_path / "x.zarr"]
    missing = invoke(*build, "--data", f"{s3}/train/{{00000..00004}}.tar", check=False)
    assert missing.returncode == 1 and "00003.tar does not exist" in missing.stderr
    no_credentials = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                      "AWS_CONFIG_FILE": "/nonexistent"}
    env = {k: v for k, v in os.environ.items() if k not in no_credentials} | {
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", *map(str, build), "--data", remote_train], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1 and remote_train in result.stderr and "credentials" in result.stderr
    assert "Traceback" not in result.stderr
    # processes of their own: another endpoint or no credentials, where s3fs keeps filesystems per process
    unreachable = cli(*build, "--data", remote_train, check=False,
                      env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 1 and remote_train in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_run_folder_on_object_storage_trains_resumes_and_loads_in_open_clip(s3, synth_corpus, tmp_path):
    """--out s3://...: a run stopped by SIGTERM at step 3 continues with --resume auto from the object store (its
    lease taken over from a holder that died), equals a local run, and its downloaded folder loads in open_clip."""
    import json
    import os
    import signal
    import time

    import open_clip
    import torch
    from safetensors.torch import load_file

    from common.errors import Interrupted
    from common.lock import OutputLocked
    from common.remote_folder import LEASE_TTL_S
    from stage2_student.train import Trainer, TrainOptions

    def options(out: str, **extra) -> TrainOptions:
        return TrainOptions(data=str(synth_corpus / "train"), out=out, student=STUDENT, losses="task", batch_size=32,
                            steps=6, warmup=1, workers=0, log_every=1, save_every=2, keep=1, **extra)

    local = tmp_path / "local"
    Trainer(options(str(local))).run()
    url, fs = f"{s3}/runs/x", fsspec.filesystem("s3")
    first = Trainer(options(url, resume="auto"))
    steps = []

    def stop_at_step_3(module, args):  # a scheduler's SIGTERM, delivered while step 3 runs
        if module.training:
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
    first.student.clip.visual.register_forward_pre_hook(stop_at_step_3)
    with pytest.raises(Interrupted, match=f"after step 3: saved {url}/resume.pt; run the same command again"):
        first.run()
    remote = sorted(p.split("/runs/x/")[1] for p in fs.find("kd-test/runs/x"))
    assert {"resume.pt", "open_clip_model.safetensors", "metrics.jsonl", "checkpoints/step_000003/"
            "open_clip_model.safetensors"} <= set(remote) and not fs.exists("kd-test/runs/x.lock")

    lease = {"host": "node-7", "pid": 4242}
    fs.pipe_file("kd-test/runs/x.lock", json.dumps(lease | {"heartbeat": time.time()}).encode())
    with pytest.raises(OutputLocked, match=r"--out s3://kd-test/runs/x is being written by another process "
                                           r"\(pid 4242 on node-7"):
        Trainer(options(url, resume="auto"))
    fs.pipe_file("kd-test/runs/x.lock", json.dumps(lease | {"heartbeat": time.time() - LEASE_TTL_S - 1}).encode())
    Trainer(options(url, resume="auto")).run()  # the requeued job: the dead holder's lease is taken over
    assert not fs.exists("kd-test/runs/x.lock")

    copy = tmp_path / "downloaded"
    fs.get("kd-test/runs/x", str(copy), recursive=True)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir() if p.is_dir()) == ["step_000006"]
    assert [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{copy}")
    straight = load_file(local / "open_clip_model.safetensors")
    assert all(torch.equal(model.state_dict()[k], straight[k]) for k in straight)
    assert "# x" in (copy / "README.md").read_text()  # named by the URL, not by its staging copy
