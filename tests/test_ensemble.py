"""Reinforced stores: several teachers over the same rows, synthetic captions, and students learning from them."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from common.cache import CacheError, CacheStore, dequantize
from common.models import create_clip
from stage1_teacher.build import BuildOptions, build_cache
from stage1_teacher.captions import CaptionOptions, build_captions
from stage1_teacher.inspect import store_summary
from stage2_student.losses import LOSSES, StudentOutputs, TeacherTargets
from stage2_student.train import Trainer
from tests.helpers import assert_stores_equal, invoke, save_random_checkpoint, torchrun
from tests.test_stage2 import options

TEACHER_A, TEACHER_B, CAPTIONER = "kd-test-teacher", "kd-test-student", "kd-test-coca"
BUILD = dict(batch_size=32, grad_batch=32, chunk_rows=64, workers=0, views=2)
CAPTIONS = dict(num=3, seq_len=8, batch_size=64)  # short captions: a random-init CoCa writes them to the end


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ens")
    return {"a": save_random_checkpoint(TEACHER_A, root / "a.pt", seed=5),
            "b": save_random_checkpoint(TEACHER_B, root / "b.pt", seed=7)}


@pytest.fixture(scope="module")
def main_only(synth_corpus, ckpts, tmp_path_factory) -> Path:
    """Teacher a built alone (read-only: copy it to add to it)."""
    out = tmp_path_factory.mktemp("ens") / "main.zarr"
    build_cache(BuildOptions(teacher=TEACHER_A, pretrained=str(ckpts["a"]), data=str(synth_corpus / "train"),
                             out=str(out), **BUILD))
    return out


@pytest.fixture(scope="module")
def store(synth_corpus, ckpts, main_only, tmp_path_factory) -> Path:
    """Teacher a built, teacher b (another config and width) added, then 3 captions per image (random tiny CoCa)."""
    out = tmp_path_factory.mktemp("ens") / "two.zarr"
    data = str(synth_corpus / "train")
    shutil.copytree(main_only, out)
    build_cache(BuildOptions(teacher=TEACHER_B, pretrained=str(ckpts["b"]), data=data, out=str(out), name="b",
                             workers=0))
    build_captions(CaptionOptions(store=str(out), data=data, captioner=CAPTIONER, **CAPTIONS))
    return out


def test_an_added_teacher_equals_its_own_build_and_plain_zarr_reads_it(store, synth_corpus, ckpts, tmp_path):
    alone = tmp_path / "b_alone.zarr"
    build_cache(BuildOptions(teacher=TEACHER_B, pretrained=str(ckpts["b"]), data=str(synth_corpus / "train"),
                             out=str(alone), **BUILD))
    plain, single = zarr.open_group(str(store), mode="r"), zarr.open_group(str(alone), mode="r")
    for name in ("image_emb", "text_emb", "image_grad", "text_grad"):
        np.testing.assert_array_equal(plain[f"teachers/b/{name}"][:], single[name][:], err_msg=name)
    for name in ("valid", "view_boxes", "view_flips", "grad_batches"):  # shared, and what b alone would write
        np.testing.assert_array_equal(plain[name][:], single[name][:], err_msg=name)
    assert plain["teachers/b"].attrs["embed_dim"] == 32 and plain.attrs["embed_dim"] == 48
    summary = store_summary(str(store))
    assert summary["teachers"].startswith("main = kd-test-teacher") and "b = kd-test-student" in summary["teachers"]
    assert summary["synthetic captions"].startswith("3 per image by kd-test-coca")


def test_add_teacher_refuses_duplicates_bad_names_and_other_data(store, synth_corpus, ckpts, tmp_path):
    data = str(synth_corpus / "train")
    add = lambda **kw: build_cache(BuildOptions(**{"teacher": TEACHER_B, "pretrained": str(ckpts["b"]),  # noqa: E731
                                                   "data": data, "out": str(store), "workers": 0, **kw}))
    with pytest.raises(CacheError, match="already holds this teacher .* as 'b'"):
        add(name="c")
    with pytest.raises(CacheError, match="already holds this teacher .* as 'main'"):
        add(name="c", teacher=TEACHER_A, pretrained=str(ckpts["a"]))
    with pytest.raises(CacheError, match="built differently"):  # 'main' is the build's teacher: not replaced
        add(name="main")
    with pytest.raises(CacheError, match="--name"):
        add(name="x/y")
    other = save_random_checkpoint(TEACHER_B, tmp_path / "other.pt", seed=8)
    with pytest.raises(CacheError, match="another teacher named 'b'"):
        add(name="b", pretrained=str(other))
    with pytest.raises(CacheError, match="other data"):
        add(name="c", pretrained=str(other), data=str(synth_corpus / "val"))
    with pytest.raises(CacheError, match="no teacher 'nope'"):
        CacheStore(str(store)).teacher("nope")


def test_an_interrupted_add_teacher_resumes_to_the_same_arrays(store, synth_corpus, ckpts, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")["teachers/b"]
    before, captions_before = group["image_emb"][:], group["caption_text_emb"][:]
    group["blocks_done"][1] = False
    group["image_emb"][64:128] = 0
    group.attrs.update({"complete": False, "captions": None})  # and the captions came after it: embeds them too
    del group["caption_text_emb"]
    with pytest.raises(CacheError, match="teacher 'b' is incomplete"):
        CacheStore(str(copy)).teacher("b")
    build_cache(BuildOptions(teacher=TEACHER_B, pretrained=str(ckpts["b"]), data=str(synth_corpus / "train"),
                             out=str(copy), name="b", workers=0))
    resumed = zarr.open_group(str(copy), mode="r")["teachers/b"]
    np.testing.assert_array_equal(resumed["image_emb"][:], before)
    np.testing.assert_array_equal(resumed["caption_text_emb"][:], captions_before)
    assert CacheStore(str(copy)).teacher("b").teacher_group.attrs["captions"] == resumed.attrs["captions"]


def test_add_teacher_and_captions_on_two_ranks_equal_one_process(store, main_only, synth_corpus, ckpts, tmp_path):
    """torchrun splits add-teacher's windows and the captions' blocks across ranks: the same arrays as one process."""
    out, data = tmp_path / "ranks.zarr", str(synth_corpus / "train")
    shutil.copytree(main_only, out)
    torchrun("stage1_teacher.cli", "add-teacher", out, "--name", "b", "--teacher", TEACHER_B, "--pretrained",
             ckpts["b"], "--data", data, "--workers", "0")
    torchrun("stage1_teacher.cli", "captions", out, "--data", data, "--captioner", CAPTIONER, "--per-image",
             CAPTIONS["num"], "--seq-len", CAPTIONS["seq_len"], "--batch-size", CAPTIONS["batch_size"])
    assert_stores_equal(out, store)  # teachers/b/*, captions/text and both teachers' caption_text_emb included


def test_captions_are_stored_and_embedded_by_every_teacher(store, ckpts):
    texts = zarr.open_group(str(store), mode="r")["captions/text"][:]
    assert texts.shape == (192, 3) and all(isinstance(t, str) for t in texts.reshape(-1)[:10])
    main = CacheStore(str(store))
    for name, config in (("main", TEACHER_A), ("b", TEACHER_B)):
        view = main.teacher(name)
        teacher = create_clip(config, str(ckpts["a" if name == "main" else "b"]))
        rows = [0, 5, 191]
        fresh = teacher.embed_texts(teacher.tokenizer([str(t) for t in texts[rows].reshape(-1)]))
        stored = torch.from_numpy(dequantize(view.rows("caption_text_emb", np.array(rows)))).reshape(-1, fresh.shape[1])
        assert F.cosine_similarity(fresh, stored).min() > 0.999, name


def test_ensemble_from_cache_equals_live_teachers_with_synthetic_captions(store, synth_corpus, tmp_path):
    losses = "task,crd,fd,icl,afd,gd"
    kw = dict(cache=str(store), losses=losses, teachers="all", synthetic_captions=0.5)
    cached = Trainer(options(synth_corpus, tmp_path / "a", teacher_targets="cache", **kw))
    live = Trainer(options(synth_corpus, tmp_path / "b", teacher_targets="live", **kw))
    assert list(cached.targets) == ["main", "b"] and set(live.teachers) == {"main", "b"}
    batch, live_batch = cached.loader(0, 0).dataset[0, 0], live.loader(0, 0).dataset[0, 0]
    assert batch["teacher_inputs"] == {} and set(live_batch["teacher_inputs"]) == {"main", "b"}
    assert 0 < int((batch["caption"] >= 0).sum()) < 32  # about half the samples show a synthetic caption
    assert torch.equal(batch["student_tokens"], live_batch["student_tokens"])
    _, cached_terms = cached.compute_loss(batch)
    _, live_terms = live.compute_loss(live_batch)
    for name in [*losses.split(","), "fd@main", "fd@b", "icl@b", "gd@main"]:
        assert cached_terms[name] == pytest.approx(live_terms[name], rel=2e-3, abs=1e-4), name
    assert cached_terms["fd"] == pytest.approx((cached_terms["fd@main"] + cached_terms["fd@b"]) / 2, rel=1e-5)
    last = Trainer(options(synth_corpus, tmp_path / "c", **kw)).run()
    assert math.isfinite(last["loss"]) and last["cache_hit_rate"] == 1.0


def test_ensemble_crd_is_the_kl_to_the_mean_teacher_distribution():
    torch.manual_seed(0)
    b = 8
    student = StudentOutputs(image_emb=torch.randn(b, 16), text_emb=torch.randn(b, 16),
                             logit_scale=torch.tensor(20.0))
    teachers = [TeacherTargets(image_emb=F.normalize(torch.randn(b, d), dim=1),
                               text_emb=F.normalize(torch.randn(b, d), dim=1), logit_scale=s)
                for d, s in ((24, 50.0), (40, 80.0))]
    crd = LOSSES["crd"](None)
    z_s = 20.0 * F.normalize(student.image_emb, dim=1) @ F.normalize(student.text_emb, dim=1).t()
    z_t = [t.logit_scale * t.image_emb @ t.text_emb.t() for t in teachers]

    def kl_to_mean(s, ts):
        p = torch.stack([z.softmax(1) for z in ts]).mean(0)
        return (p * (p.log() - s.log_softmax(1))).sum(1).mean()

    expected = 0.5 * (kl_to_mean(z_s, z_t) + kl_to_mean(z_s.t(), [z.t() for z in z_t]))
    assert crd.forward_teachers(student, teachers).item() == pytest.approx(expected.item(), rel=1e-5)
    assert crd(student, teachers[0]).item() == pytest.approx(crd.forward_teachers(student, teachers[:1]).item())


def test_bad_teacher_and_caption_options_fail_before_training(store, synth_corpus, tmp_path, ckpts):
    with pytest.raises(CacheError, match="no teacher 'zzz'"):
        Trainer(options(synth_corpus, tmp_path / "a", cache=str(store), teachers="main,zzz"))
    with pytest.raises(ValueError, match="give --cache"):
        Trainer(options(synth_corpus, tmp_path / "b", teachers="main", losses="task"))
    with pytest.raises(ValueError, match="not among --teachers"):
        Trainer(options(synth_corpus, tmp_path / "c", cache=str(store), teacher_targets="live",
                        teacher_pretrained=f"nope={ckpts['a']}"))


def test_cli_lists_teachers_verifies_each_and_finds_an_added_teacher_complete(store, synth_corpus, tmp_path):
    data = str(synth_corpus / "train")
    pretrained = zarr.open_group(str(store), mode="r")["teachers/b"].attrs["teacher"]["pretrained"]
    again = invoke("stage1_teacher.cli", "add-teacher", str(store), "--name", "b", "--teacher", TEACHER_B,
                   "--pretrained", str(pretrained), "--data", data, "--workers", "0")
    assert "teacher b is already complete" in again.stderr
    verified = invoke("stage1_teacher.cli", "verify", str(store), "--data", data, "--sample", "4")
    assert "[b] image embeddings: 4 rows" in verified.stdout and "[main] integrity" in verified.stdout
    assert verified.stdout.strip().endswith("OK")
    evaluated = invoke("evaluation.cli", "retrieval", "--cache", str(store), "--cache-teacher", "b", "--data", data,
                       "--output", str(tmp_path / "b.json"))
    assert "192 images" in evaluated.stdout
    assert json.loads((tmp_path / "b.json").read_text())["model"] == "kd-test-student"  # teacher b's embeddings
