"""Stage two: kd-train against the cache and the live teacher, checkpoints, resume, ranks, bad input."""
from __future__ import annotations

import dataclasses
import json
import re
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
from safetensors.torch import load_file
import zarr

from common.cache import CacheError
from common.corpus import CorpusError
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.losses import CACHEABLE_TARGETS, LOSSES, LossSpecError
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import REPO, cli, save_random_checkpoint, torchrun

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return save_random_checkpoint(TEACHER, tmp_path_factory.mktemp("t2") / "teacher.pt", seed=5)


def _build(corpus: Path, ckpt: Path, out: Path, views: int) -> Path:
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpt), data=str(corpus), out=str(out), views=views,
                             batch_size=32, grad_batch=32, chunk_rows=64, workers=0))
    return out


@pytest.fixture(scope="module")
def cache(synth_corpus, teacher_ckpt, tmp_path_factory) -> Path:
    return _build(synth_corpus / "train", teacher_ckpt, tmp_path_factory.mktemp("c") / "clean.zarr", views=0)


@pytest.fixture(scope="module")
def cache_views(synth_corpus, teacher_ckpt, tmp_path_factory) -> Path:
    return _build(synth_corpus / "train", teacher_ckpt, tmp_path_factory.mktemp("c") / "views.zarr", views=2)


def options(corpus: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=str(corpus / "train"), out=str(out), student=STUDENT, batch_size=32, steps=2, warmup=1,
                workers=0, log_every=1, save_every=1000)
    return TrainOptions(**{**base, **kw})


def test_cache_and_live_teacher_give_the_same_losses(synth_corpus, cache, tmp_path):
    losses = "task,crd,fd,icl,afd,gd,cka"
    by_cache = Trainer(options(synth_corpus, tmp_path / "a", cache=str(cache), losses=losses, teacher_targets="cache"))
    live = Trainer(options(synth_corpus, tmp_path / "b", cache=str(cache), losses=losses, teacher_targets="live"))
    batch = by_cache.loader(0, 0).dataset[0, 0]
    assert batch["teacher_inputs"] == {}  # nothing is rendered for the teacher when the cache serves all
    live_batch = live.loader(0, 0).dataset[0, 0]
    assert torch.equal(batch["rows"], live_batch["rows"])
    _, cached_terms = by_cache.compute_loss(batch)
    _, live_terms = live.compute_loss(live_batch)
    assert by_cache.targets["main"].cache_hits == 1 and live.targets["main"].live_batches == 1
    for name in losses.split(","):
        assert cached_terms[name] == pytest.approx(live_terms[name], rel=2e-3, abs=1e-4), name


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"task", "caption"}))  # caption: tests/test_captions.py
def test_every_loss_trains_from_cache_or_live_fallback(loss, synth_corpus, cache, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses=f"task,{loss}", steps=1))
    last = trainer.run()
    assert np.isfinite(last[loss]) and np.isfinite(last["loss"])
    uses_live = bool(LOSSES[loss].teacher_needs - CACHEABLE_TARGETS)
    assert (last["live_batches"], last["cache_hits"]) == ((1, 0) if uses_live else (0, 1))


def test_icl_afd_mfd_through_live_fallback_with_fresh_crops(synth_corpus, cache, tmp_path):
    """--augment on a cache without stored views: every batch's view is new, so the teacher runs live."""
    last = Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses="icl,afd,mfd", augment=True)).run()
    assert last["live_batches"] == 2 and last["cache_hits"] == 0
    assert all(np.isfinite(last[k]) for k in ("icl", "afd", "mfd"))


def test_augment_with_stored_views_is_served_from_cache(synth_corpus, cache_views, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path, cache=str(cache_views), losses="fd", augment=True,
                              teacher_targets="cache"))
    batch = trainer.loader(0, 0).dataset[0, 0]
    assert set(batch["view"].tolist()) <= {1, 2}
    # the regenerated crop matches the teacher's stored embedding of that view
    live = Trainer(options(synth_corpus, tmp_path / "live", cache=str(cache_views), losses="fd", augment=True,
                           teacher_targets="live"))
    live_batch = live.loader(0, 0).dataset[0, 0]
    cached = trainer.teacher_targets(batch).image_emb
    fresh = live.teacher_targets(live_batch).image_emb
    assert torch.nn.functional.cosine_similarity(cached, fresh).min() > 0.999
    hits_before = trainer.targets["main"].cache_hits
    assert trainer.run()["cache_hits"] - hits_before == 2


def test_teacher_targets_cache_refuses_what_it_cannot_serve(synth_corpus, cache, tmp_path):
    with pytest.raises(CacheError, match=r"image_tokens.*--teacher-targets auto"):
        Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses="tokenfd", teacher_targets="cache"))
    with pytest.raises(CacheError, match="--views K"):
        Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses="fd", augment=True, teacher_targets="cache"))


def test_gd_cached_gradients_equal_recomputed(synth_corpus, cache, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses="gd", batching="cache"))
    batch = trainer.loader(0, 0).dataset[0, 0]
    group = zarr.open_group(str(cache), mode="r")
    assert sorted(batch["cache_rows"].tolist()) in [sorted(b.tolist()) for b in group["grad_batches"][...]]
    with_cached = trainer.teacher_targets(batch)
    assert with_cached.image_grad is not None
    recomputed = dataclasses.replace(with_cached, image_grad=None, text_grad=None)  # GD recomputes them
    student = trainer.student.project(trainer.student(batch["student_images"], batch["student_tokens"],
                                                      trainer.model.needs), "main")
    gd = trainer.loss_set.losses["gd"].members["main"]
    # stored gradients are g * grad_batch / s_t in fp16: each entry within 2^-11 of the exact one
    assert gd(student, with_cached).item() == pytest.approx(gd(student, recomputed).item(), rel=1e-3)


def test_mfd_student_sees_only_the_kept_patches(synth_corpus, cache, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path, cache=str(cache), losses="mfd"))
    batch = trainer.loader(0, 0).dataset[0, 0]
    images, tokens = batch["student_images"][:2], batch["student_tokens"][:2]
    student = trainer.student
    n_patches = (24 // 8) ** 2

    def masked(x, seed):
        torch.manual_seed(seed)
        return student.project(student(x, tokens, frozenset({"masked_image_emb_proj"}), 0.75),
                               "main").masked_image_emb_proj

    torch.manual_seed(3)
    keep = torch.randn(2, n_patches).topk(max(1, int(n_patches * 0.25)), dim=-1).indices  # PatchDropout's draw
    patch = lambda i: (slice(None), slice(8 * (i // 3), 8 * (i // 3) + 8), slice(8 * (i % 3), 8 * (i % 3) + 8))  # noqa: E731
    dropped = [i for i in range(n_patches) if i not in keep[0].tolist()]
    changed_dropped = images.clone()
    changed_dropped[0][patch(dropped[0])] += 3.0
    changed_kept = images.clone()
    changed_kept[0][patch(int(keep[0, 0]))] += 3.0
    base = masked(images, 3)
    assert torch.allclose(masked(changed_dropped, 3)[0], base[0], atol=1e-6)  # masked-out pixels are not seen
    assert not torch.allclose(masked(changed_kept, 3)[0], base[0], atol=1e-4)  # kept pixels are
    full = student.project(student(images, tokens, frozenset({"image_emb_proj"})), "main").image_emb_proj
    assert not torch.allclose(full, base, atol=1e-4)  # and it is not the full-image forward


def test_checkpoint_loads_in_open_clip_and_baseline_needs_no_cache(synth_corpus, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path, losses="task"))
    trainer.run()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    images = torch.randn(2, 3, 24, 24)
    trainer.student.eval()
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(images), trainer.student.clip.encode_image(images), atol=1e-6)
    fresh = open_clip.create_model(STUDENT)
    assert not torch.allclose(fresh.encode_image(images), model.encode_image(images), atol=1e-4)


def test_invalid_cache_rows_are_skipped_and_counted(synth_corpus, cache, tmp_path):
    copy = tmp_path / "holes.zarr"
    shutil.copytree(cache, copy)
    group = zarr.open_group(str(copy), mode="r+")
    valid = group["valid"][...]
    valid[[3, 70, 150]] = False
    group["valid"][:] = valid
    trainer = Trainer(options(synth_corpus, tmp_path / "run", cache=str(copy), losses="fd"))  # tmp_path holds the copy
    assert trainer.skipped_invalid == 3
    rows = trainer.order.micro_batches(0).ravel()
    assert not {3, 70, 150} & set(rows.tolist())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_reproduces_losses(synth_corpus, cache, tmp_path):
    args = ["--data", synth_corpus / "train", "--student", STUDENT, "--cache", cache, "--losses", "task,fd,icl,crd,mfd",
            "--batch-size", "32", "--steps", "7", "--warmup", "2", "--log-every", "1", "--save-every", "2",
            "--workers", "0"]
    cli("stage2_student.cli", "--out", tmp_path / "straight", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", "--out", str(out), *map(str, args)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not ((out / "metrics.jsonl").exists() and len(_metrics(out)) >= 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it was killed"
    cli("stage2_student.cli", "--out", out, "--resume", *args)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 8))
    for a, b in zip(straight, resumed):
        for key in ("loss", "task", "fd", "icl", "crd", "mfd", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


def test_two_ranks_step0_losses_equal_single_process(synth_corpus, cache, tmp_path, kd_cache_dir):
    """Two ranks on one node read the targets from one node-local memory-mapped copy, and give the
    single-process losses."""
    args = ["--data", str(synth_corpus / "train"), "--student", STUDENT, "--cache", str(cache),
            "--losses", "task,fd,icl,crd,gd,afd", "--batch-size", "32", "--steps", "1", "--log-every", "1",
            "--workers", "0", "--warmup", "1"]
    cli("stage2_student.cli", "--out", tmp_path / "one", *args)
    torchrun("stage2_student.cli", "--out", tmp_path / "two", *args)
    assert list((kd_cache_dir / "targets").glob("*-image_emb.npy")), "no node-local copy of the targets"
    one, two = _metrics(tmp_path / "one")[0], _metrics(tmp_path / "two")[0]
    for key in ("loss", "task", "fd", "icl", "crd", "gd", "afd"):
        assert one[key] == pytest.approx(two[key], rel=1e-4), key
    # the gradient step agrees too. Adam's first step is ~lr * sign(g), so gradients that are ~0 up to summation
    # order may step either way: require agreement on all but a sliver of the weights.
    a = load_file(tmp_path / "one" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "two" / "open_clip_model.safetensors")
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert differing <= 1e-3 * sum(v.numel() for v in a.values())


def test_bad_input_fails_before_any_work(synth_corpus, cache, tmp_path):
    def fails(match, exc=Exception, **kw):
        with pytest.raises(exc, match=match):
            Trainer(options(synth_corpus, tmp_path / "x", **{"cache": str(cache), **kw}))
        assert not (tmp_path / "x").exists()

    fails(r"unknown loss 'fdd'", LossSpecError, losses="fdd")
    fails(r"weight 'two' of 'fd'", LossSpecError, losses="fd:two")
    fails(r"matches no shard|does not exist", CorpusError, data=str(tmp_path / "nothing-{0..3}.tar"))
    fails("00000.tar is not the 00000.tar the cache holds .*" + re.escape(f"--data '{synth_corpus}/train/{{00000..00002}}.tar'"),
          CacheError, data=str(synth_corpus / "val"))
    fails(r"needs teacher targets", CacheError, cache=None, losses="fd")
    missing = tmp_path / "missing.zarr"
    shutil.copytree(cache, missing)
    shutil.rmtree(missing / "text_emb")
    group = zarr.open_group(str(missing), mode="r+")
    assert "text_emb" not in group
    fails(r"lacks array\(s\) \['text_emb'\]", CacheError, cache=str(missing), losses="fd")
    result = cli("stage2_student.cli", "--data", synth_corpus / "train", "--out", tmp_path / "y", "--student",
                 STUDENT, "--cache", cache, "--losses", "crd:1,bogus", check=False)
    # refused with the other options, as click refuses a bad option value (usage error, exit 2)
    assert result.returncode == 2 and "unknown loss 'bogus'" in result.stderr and "Traceback" not in result.stderr


def test_targets_over_the_memory_budget_are_read_chunk_aware(synth_corpus, cache_views, tmp_path):
    """A cache bigger than --target-memory-gb is read in whole chunks on demand, with the same targets."""
    in_memory = Trainer(options(synth_corpus, tmp_path / "m", cache=str(cache_views), losses="fd,gd",
                                augment=True, batching="cache"))
    chunked = Trainer(options(synth_corpus, tmp_path / "c", cache=str(cache_views), losses="fd,gd",
                              augment=True, batching="cache", target_memory_gb=1e-6))
    assert not in_memory.targets["main"].chunked and chunked.targets["main"].chunked
    requested = 0
    for step in range(3):
        batch = in_memory.loader(0, 0).dataset[0, step]
        assert set(batch["view"].tolist()) <= {1, 2}  # stored views: the (N, 1+K, D) path
        # each trainer's own loader item: the targets are looked up where the item is made
        a, b = in_memory.teacher_targets(batch), chunked.teacher_targets(chunked.loader(0, 0).dataset[0, step])
        assert a.image_grad is None and b.image_grad is None  # augmented views: GD recomputes the gradients
        for name in ("image_emb", "text_emb"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        requested += len(batch["cache_rows"])
    reads = chunked.targets["main"].arrays["image_emb"].chunk_reads
    assert 0 < reads < requested  # whole chunks, not rows (192 rows = 3 chunks of 64)
    assert chunked.run()["cache_hits"] >= 2
