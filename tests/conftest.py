"""Shared fixtures: a small synthetic corpus, generated once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.synth import generate_corpus


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a `kd-data synth` corpus: train 192 samples (3 shards of 64), val 48 (2 shards of 24, 3-5
    captions each), zeroshot 48 (2 shards of 24, plus classnames.txt / templates.txt), 32x32 images, seed 0,
    keys 000000000-000000287, and corpus.json. Shared by the whole session: treat it as read-only."""
    root = tmp_path_factory.mktemp("synth_corpus")
    generate_corpus(root, {"train": 192, "val": 48, "zeroshot": 48},
                    shard_size={"train": 64, "val": 24, "zeroshot": 24}, seed=0, image_size=32)
    return root
