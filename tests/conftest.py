"""Shared fixtures, made once per test session (per xdist worker): a small synthetic corpus, a teacher checkpoint,
the teacher's stores over the train split, a real S3 endpoint. Treat them as read-only (copy a store to damage
it)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from common.synth import generate_corpus
from stage1_teacher.build import BuildOptions, build_cache
from tests.helpers import STORE_OPTIONS, STORE_TEACHER, save_random_checkpoint


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a `kd-data synth` corpus: train 192 samples (3 shards of 64), val 48 (2 shards of 24, 3-5
    captions each), zeroshot 48 (2 shards of 24, plus classnames.txt / templates.txt), 32x32 images, seed 0,
    keys 000000000-000000287, and corpus.json. Shared by the whole session: treat it as read-only."""
    root = tmp_path_factory.mktemp("synth_corpus")
    generate_corpus(root, {"train": 192, "val": 48, "zeroshot": 48},
                    shard_size={"train": 64, "val": 24, "zeroshot": 24}, seed=0, image_size=32)
    return root


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-init kd-test-teacher checkpoint (stands in for pretrained weights)."""
    return save_random_checkpoint(STORE_TEACHER, tmp_path_factory.mktemp("teacher") / "teacher.pt", seed=123)


def _train_store(synth_corpus: Path, teacher_ckpt: Path, out: Path, views: int) -> Path:
    build_cache(BuildOptions(teacher=STORE_TEACHER, pretrained=str(teacher_ckpt), data=str(synth_corpus / "train"),
                             out=str(out), views=views, **STORE_OPTIONS))
    return out


@pytest.fixture(scope="session")
def train_store(synth_corpus, teacher_ckpt, tmp_path_factory) -> Path:
    """`teacher_ckpt`'s store over the train split (STORE_OPTIONS, no views)."""
    return _train_store(synth_corpus, teacher_ckpt, tmp_path_factory.mktemp("stores") / "train.zarr", views=0)


@pytest.fixture(scope="session")
def views_store(synth_corpus, teacher_ckpt, tmp_path_factory) -> Path:
    """The same with 2 augmented views per sample (`--views 2`)."""
    return _train_store(synth_corpus, teacher_ckpt, tmp_path_factory.mktemp("stores") / "views.zarr", views=2)


@pytest.fixture(scope="session", autouse=True)
def kd_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Index sidecars and pipe: copies go to a per-session directory (also for CLI subprocesses), not ~/.cache."""
    path = tmp_path_factory.mktemp("kd_cache_dir")
    os.environ["KD_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real S3 endpoint on localhost (moto's standalone server in its own process) with bucket `kd-test`, reached
    through the real client stack (s3fs/aiobotocore) with credentials and endpoint from the environment, as a
    user sets them. Yields the bucket URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(200):  # up to 20 s for the server to listen
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto server did not start on port {port}")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("kd-test")
        yield "s3://kd-test"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
