"""GD's teacher gradients with `--augment --batching cache` on a store with views.

The store's gradients are those of the clean view (view 0) of each gradient batch; a batch whose samples saw a
stored augmented view must get the exact gradients of the embeddings it is served, never view 0's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from common.contrastive import clip_loss_grads
from stage2_student.losses.clip_kd import _teacher_grads
from stage2_student.train import Trainer, TrainOptions

STUDENT = "kd-test-student"


@pytest.fixture(scope="module")
def store_with_views(views_store) -> Path:
    """conftest's real `--views 2` store over the train split, gradient batches of 32."""
    return views_store


def trainer(corpus: Path, store: Path, out: Path, augment: bool) -> Trainer:
    return Trainer(TrainOptions(data=str(corpus / "train"), out=str(out), student=STUDENT, cache=str(store),
                                losses="gd", batching="cache", augment=augment, batch_size=32, steps=1, warmup=1,
                                workers=0))


def test_augmented_views_get_the_gradients_of_their_own_embeddings(synth_corpus, store_with_views, tmp_path):
    t = trainer(synth_corpus, store_with_views, tmp_path, augment=True)
    batch = t.loader(0, 0).dataset[0, 0]
    assert set(batch["view"].tolist()) <= {1, 2}  # every sample saw a stored augmented view
    served = t.teacher_targets(batch)
    assert served.image_grad is None and served.text_grad is None  # not view 0's: GD recomputes them on the batch
    image_grad, text_grad = _teacher_grads(served)
    exact = clip_loss_grads(served.image_emb, served.text_emb, served.logit_scale)
    torch.testing.assert_close(image_grad, exact[0])
    torch.testing.assert_close(text_grad, exact[1])
    group = zarr.open_group(str(store_with_views), mode="r")
    stored = group["image_grad"][...][batch["cache_rows"].numpy()].astype(np.float32) / group.attrs["grad_scale"]
    assert not np.allclose(image_grad.numpy(), stored, atol=1e-4)  # view 0's differ


def test_clean_view_batches_get_the_stored_gradients(synth_corpus, store_with_views, tmp_path):
    t = trainer(synth_corpus, store_with_views, tmp_path, augment=False)
    batch = t.loader(0, 0).dataset[0, 0]
    assert set(batch["view"].tolist()) == {0}
    served = t.teacher_targets(batch)
    group = zarr.open_group(str(store_with_views), mode="r")
    rows, scale = batch["cache_rows"].numpy(), np.float32(group.attrs["grad_scale"])  # stored as g * grad_scale
    assert torch.equal(served.image_grad, torch.from_numpy(group["image_grad"][...][rows].astype(np.float32) / scale))
    assert torch.equal(served.text_grad, torch.from_numpy(group["text_grad"][...][rows].astype(np.float32) / scale))
