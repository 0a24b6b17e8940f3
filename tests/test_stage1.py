"""Stage one: `kd-cache build` against direct open_clip forwards, autograd, kills, ranks and bad data."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import zarr

from common.cache import CacheError, CacheStore
from common.contrastive import clip_loss
from common.corpus import Corpus, CorpusError
from common.synth import make_sample, write_shard
from common.views import view_from_arrays, crop_view
from stage1_teacher.build import BuildOptions, build_cache
from tests.helpers import (REPO, STORE_OPTIONS, assert_stores_equal, invoke, plain_keys, save_random_checkpoint,
                           torchrun)

TEACHER = "kd-test-teacher"
SMALL = STORE_OPTIONS  # 3 windows of 2 blocks


@pytest.fixture(scope="module")
def store(views_store) -> Path:
    """conftest's `views_store`: `teacher_ckpt`'s build with 2 views, SMALL."""
    return views_store


def test_rows_equal_direct_open_clip_forward(store, synth_corpus, teacher_ckpt):
    """Row i (every view) equals open_clip's own model/transform/tokenizer on sample i read by webdataset."""
    model, _, preprocess = open_clip.create_model_and_transforms(TEACHER, pretrained=str(teacher_ckpt))
    tokenizer = open_clip.get_tokenizer(TEACHER)
    model.eval()
    urls = [str(p) for p in sorted((synth_corpus / "train").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    group = zarr.open_group(str(store), mode="r")
    assert plain_keys(group) == [s["__key__"] for s in samples]
    boxes, flips = group["view_boxes"][...], group["view_flips"][...]
    images = []
    for i, s in enumerate(samples):
        views = [s["jpg"]] + [crop_view(s["jpg"], view_from_arrays(boxes[i, v], flips[i, v])) for v in range(2)]
        images.append(torch.stack([preprocess(v.convert("RGB")) for v in views]))
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.cat(images)), dim=-1).view(len(samples), 3, -1)
        text = F.normalize(model.encode_text(tokenizer([s["txt"].splitlines()[0] for s in samples])), dim=-1)
    stored_image = torch.from_numpy(group["image_emb"][...].astype(np.float32))
    stored_text = torch.from_numpy(group["text_emb"][...].astype(np.float32))
    assert group["image_emb"].dtype == np.float16
    assert F.cosine_similarity(image, stored_image, dim=-1).min() >= 0.999
    assert F.cosine_similarity(text, stored_text, dim=-1).min() >= 0.999
    # the augmented views really are different pixels
    assert F.cosine_similarity(stored_image[:, 0], stored_image[:, 1], dim=-1).mean() < 0.9999
    assert group.attrs["teacher_logit_scale"] == pytest.approx(model.logit_scale.exp().item())


def test_gradients_equal_autograd_on_recorded_batches(store):
    group = zarr.open_group(str(store), mode="r")
    batches = group["grad_batches"][...]
    valid = group["valid"][...]
    rows = batches[batches >= 0]
    assert sorted(rows.tolist()) == np.flatnonzero(valid).tolist()  # every valid row in exactly one batch
    image = group["image_emb"][...][:, 0].astype(np.float32)
    text = group["text_emb"][...].astype(np.float32)
    scale, grad_scale = group.attrs["teacher_logit_scale"], group.attrs["grad_scale"]
    assert grad_scale == pytest.approx(32 / scale)
    for batch in batches[(batches >= 0).any(axis=1)]:
        idx = batch[batch >= 0]
        i = torch.tensor(image[idx], requires_grad=True)
        t = torch.tensor(text[idx], requires_grad=True)
        g_i, g_t = torch.autograd.grad(clip_loss(i, t, scale), [i, t])
        for name, exact in (("image_grad", g_i.numpy()), ("text_grad", g_t.numpy())):
            stored = group[name][...][idx].astype(np.float32) / grad_scale  # stored as g * grad_scale in fp16
            assert np.abs(stored - exact).max() <= 1e-3 * np.abs(exact).max()
    assert np.abs(group["image_grad"][...]).max() > 0
    # a gradient batch mixes rows of several blocks (its window), not one block's stretch
    assert any(len(set(b[b >= 0] // 32)) > 1 for b in batches)


def test_store_readable_with_plain_zarr(store):
    group = zarr.open(str(store), mode="r")
    n = group["valid"].shape[0]
    assert group["image_emb"].shape == (n, 3, 48) and group["text_emb"].shape == (n, 48)
    assert group["image_grad"].dtype == np.float16 and group["valid"].dtype == bool
    assert group["view_boxes"].shape == (n, 2, 4)
    names, counts = group["index/names"][...], group["index/counts"][...]
    assert list(names) == ["00000.tar", "00001.tar", "00002.tar"] and counts.sum() == n
    assert len(plain_keys(group)) == n and group["index/offsets"].shape == (n,)
    attrs = dict(group.attrs)
    for key in ("format_version", "teacher", "corpus", "build", "embed_dim", "teacher_logit_scale"):
        assert key in attrs
    assert attrs["teacher"]["fingerprint"] and attrs["teacher"]["open_clip_version"] == open_clip.__version__
    assert attrs["build"]["views"] == 2 and attrs["complete"] is True


def test_kill_and_resume_is_bit_identical(synth_corpus, teacher_ckpt, tmp_path):
    """SIGKILL a build at random moments (twice, mid-build), re-run the same command: the store is bit-identical
    to an uninterrupted build."""
    options = dict(views=2, batch_size=8, grad_batch=32, chunk_rows=16, window_blocks=2, workers=0)  # 12 blocks
    reference = tmp_path / "reference.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(teacher_ckpt), data=str(synth_corpus / "train"),
                             out=str(reference), **options))
    out = tmp_path / "killed.zarr"
    args = ["build", "--teacher", TEACHER, "--pretrained", teacher_ckpt, "--data", synth_corpus / "train",
            "--out", out] + [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]
    done_blocks = lambda: len(list((out / "blocks_done" / "c").glob("*"))) if out.exists() else 0  # noqa: E731
    rng = random.Random(os.getpid())
    for kill in range(2):
        threshold = done_blocks() + rng.randint(1, 4)  # at most 1 + 4 + 4 < 12 blocks: never the end
        proc = subprocess.Popen([sys.executable, "-m", "stage1_teacher.cli", *map(str, args)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and done_blocks() < threshold:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))  # land anywhere inside the next block's work
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the build ended before it was killed"
    assert not zarr.open_group(str(out), mode="r").attrs.get("complete")
    assert 0 < done_blocks() < 12
    invoke("stage1_teacher.cli", *args)
    assert_stores_equal(out, reference)


def test_two_processes_equal_single_process(synth_corpus, teacher_ckpt, store, tmp_path):
    out = tmp_path / "ranks.zarr"
    torchrun("stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", teacher_ckpt, "--data",
             synth_corpus / "train", "--out", out, "--views", "2", "--batch-size", "16", "--grad-batch", "32",
             "--chunk-rows", "32", "--window-blocks", "2", "--workers", "1")
    assert_stores_equal(out, store)


def test_provenance_refusal_names_what_differs(synth_corpus, store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    other_ckpt = save_random_checkpoint(TEACHER, tmp_path / "other.pt", seed=7)
    with pytest.raises(CacheError, match=r"teacher\.fingerprint"):
        build_cache(BuildOptions(teacher=TEACHER, pretrained=str(other_ckpt), data=str(synth_corpus / "train"),
                                 out=str(copy), views=2, **SMALL))
    with pytest.raises(CacheError, match=r"corpus\.") as err:
        build_cache(BuildOptions(teacher=TEACHER, pretrained=str(other_ckpt), data=str(synth_corpus / "val"),
                                 out=str(copy), views=2, **SMALL))
    assert "--overwrite" in str(err.value)
    result = invoke("stage1_teacher.cli", "build", "--teacher", TEACHER, "--data", synth_corpus / "train",
                    "--out", copy, "--views", "1", check=False)
    assert result.returncode == 1 and "build.views" in result.stderr and "Traceback" not in result.stderr
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(other_ckpt), data=str(synth_corpus / "val"),
                             out=str(copy), overwrite=True, **SMALL))
    assert CacheStore(copy).attrs["corpus"]["num_samples"] == 48


@pytest.fixture()
def bad_corpus(tmp_path) -> Path:
    """Shard 0 clean; shard 1 with an undecodable image (key ...102) and an empty caption (...104);
    shard 2 truncated in the middle of its 4th sample."""
    root = tmp_path / "bad"
    root.mkdir()
    good = [make_sample(0, "train", i, f"{i:09d}", image_size=32) for i in range(12)]
    write_shard(root / "00000.tar", good[:4])
    broken = [dict(s) for s in good[4:8]]
    broken[0]["jpg"] = b"not a jpeg"
    broken[2]["txt"] = "   \n"
    write_shard(root / "00001.tar", broken)
    write_shard(root / "00002.tar", good[8:12])
    data = (root / "00002.tar").read_bytes()
    cut = data.index(b"000000011.jpg")  # header of the 4th sample: cut inside its image bytes
    (root / "00002.tar").write_bytes(data[:cut + 512 + 200])
    return root


def test_bad_samples_raise_naming_shard_and_key(bad_corpus):
    corpus = Corpus.open(str(bad_corpus / "0000{0..1}.tar"))
    with pytest.raises(CorpusError, match=r"00001\.tar, key 000000004: undecodable image"):
        list(corpus.read())
    with pytest.raises(CorpusError, match=r"00002\.tar.*--on-error skip"):
        Corpus.open(str(bad_corpus))


def test_bad_samples_skipped_are_invalid_rows_not_shifts(bad_corpus, teacher_ckpt, tmp_path):
    out = tmp_path / "bad.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(teacher_ckpt), data=str(bad_corpus), out=str(out),
                             on_error="skip", batch_size=4, grad_batch=4, chunk_rows=4, workers=0))
    group = zarr.open_group(str(out), mode="r")
    keys = plain_keys(group)
    valid = group["valid"][...]
    assert keys[:11] == [f"{i:09d}" for i in range(11)]
    invalid = {keys[i] for i in np.flatnonzero(~valid)}
    assert {"000000004", "000000006"} <= invalid and "000000005" not in invalid
    assert group.attrs["invalid_count"] == len(invalid)
    assert any("undecodable image" in e for e in group.attrs["invalid_examples"])
    assert any("empty caption" in e for e in group.attrs["invalid_examples"])
    assert group.attrs["corpus_errors"] and "00002.tar" in group.attrs["corpus_errors"][0]
    assert np.all(group["image_emb"][...][~valid] == 0)
    # rows after a bad sample hold their own sample: equal to a clean build of the good shard alone
    clean = tmp_path / "clean.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(teacher_ckpt), data=str(bad_corpus / "00000.tar"),
                             out=str(clean), batch_size=4, grad_batch=4, chunk_rows=4, workers=0))
    np.testing.assert_array_equal(zarr.open_group(str(clean), mode="r")["text_emb"][...], group["text_emb"][:4])
    # no valid row is left out of the gradient batches
    batches = group["grad_batches"][...]
    assert sorted(batches[batches >= 0].tolist()) == np.flatnonzero(valid).tolist()


def test_data_spec_forms(synth_corpus):
    train = synth_corpus / "train"
    by_brace = Corpus.open(str(train / "{00000..00002}.tar"))
    by_dir = Corpus.open(str(train))
    by_list = Corpus.open([str(p) for p in sorted(train.glob("*.tar"))])
    by_colons = Corpus.open("::".join(str(p) for p in sorted(train.glob("*.tar"))))
    assert by_brace.description() == by_dir.description() == by_list.description() == by_colons.description()
    sample = next(by_dir.read(70, 71))
    assert (sample.row, sample.shard, sample.index, sample.key) == (70, "00001.tar", 6, by_dir.keys[70])
    with pytest.raises(CorpusError, match=r"00003\.tar does not exist"):
        Corpus.open(str(train / "{00000..00007}.tar"))


def test_verify_passes_and_catches_tampering(store, synth_corpus, teacher_ckpt, tmp_path):
    ok = invoke("stage1_teacher.cli", "verify", store, "--data", synth_corpus / "train", "--sample", "16")
    assert "OK" in ok.stdout and "min cosine" in ok.stdout
    tampered = tmp_path / "tampered.zarr"
    shutil.copytree(store, tampered)
    group = zarr.open_group(str(tampered), mode="r+")
    group["text_emb"][:] = group["text_emb"][...][::-1]
    bad = invoke("stage1_teacher.cli", "verify", tampered, "--data", synth_corpus / "train", "--sample", "16",
                 check=False)
    assert bad.returncode != 0 and "BELOW" in bad.stdout
    wrong = invoke("stage1_teacher.cli", "verify", store, "--data", synth_corpus / "val", check=False)
    assert wrong.returncode != 0 and "was not built from" in wrong.stderr


def test_verify_defaults_to_the_shards_the_store_records(synth_corpus, teacher_ckpt, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(synth_corpus / "val" / "00000.tar", shards)
    store = tmp_path / "one.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(teacher_ckpt), data=str(shards), out=str(store),
                             **SMALL))
    ok = invoke("stage1_teacher.cli", "verify", store, "--sample", "4")
    assert ok.stdout.strip().endswith("OK") and "keys: 24 rows match the shards" in ok.stdout
    moved = tmp_path / "moved"
    shards.rename(moved)
    lost = invoke("stage1_teacher.cli", "verify", store, "--sample", "4", check=False)
    assert lost.returncode == 1 and (f"store {store} was built from --data '{shards}/00000.tar', which cannot be "
                                     f"read from here") in lost.stderr
    assert "pass --data with where those shards are now" in lost.stderr
    assert invoke("stage1_teacher.cli", "verify", store, "--data", moved, "--sample", "4").stdout.strip().endswith("OK")
