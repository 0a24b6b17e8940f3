"""Every open_clip model family as teacher and as student: open_clip ViT, ModifiedResNet, a timm CNN, a timm ViT,
a FastViT (MobileCLIP-style) tower, a sigmoid-loss (SigLIP-style) model; sigmoid gradients; refusals."""
from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from open_clip.loss import SigLipLoss

from common.cache import CacheStore, dequantize
from common.families import (INPUT_PATCHES, TOKEN_DROPOUT, describe, image_intermediates, image_size,
                             mask_input_patches)
from common.models import create_clip
from evaluation.cli import evaluate_retrieval
from stage1_teacher.build import BuildOptions, build_cache
from stage1_teacher.inspect import verify_store
from stage2_student.losses import LOSSES
from stage2_student.train import Trainer, TrainOptions

# tiny member of each family (common/model_configs), with what its image tower is
FAMILIES = {
    "kd-test-student": ("open_clip VisionTransformer", TOKEN_DROPOUT),
    "kd-test-rn": ("open_clip ModifiedResNet", INPUT_PATCHES),
    "kd-test-convnext": ("timm ConvNeXt", INPUT_PATCHES),
    "kd-test-timm-vit": ("timm VisionTransformer", TOKEN_DROPOUT),
    "kd-test-mobileclip": ("timm FastVit", INPUT_PATCHES),
    "kd-test-sigmoid": ("timm VisionTransformer", TOKEN_DROPOUT),
}
ATTENTION_FAMILIES = {"kd-test-student"}  # only open_clip transformer towers expose attention maps
ALL_LOSSES = sorted(set(LOSSES) - {"caption"})  # caption: a CoCa student (tests/test_captions.py)


def shard(corpus) -> str:
    return str(corpus / "train" / "00000.tar")  # 64 samples: enough for a step of 16 and a few gradient batches


def train(corpus, out, **kw) -> Trainer:
    opts = dict(data=shard(corpus), out=str(out), batch_size=16, steps=1, warmup=1, workers=0, log_every=1,
                save_every=1000)
    return Trainer(TrainOptions(**opts | kw))


@pytest.fixture(scope="module")
def store_of(synth_corpus, tmp_path_factory):
    """The store of a family's teacher over the first train shard, built once per module."""
    built: dict[str, str] = {}

    def build(teacher: str) -> str:
        if teacher not in built:
            out = tmp_path_factory.mktemp("families") / f"{teacher}.zarr"
            build_cache(BuildOptions(teacher=teacher, data=shard(synth_corpus), out=str(out), batch_size=32,
                                     grad_batch=32, chunk_rows=64, workers=0))
            built[teacher] = str(out)
        return built[teacher]
    return build


@pytest.fixture(scope="module")
def vit_store(store_of) -> str:
    return store_of("kd-test-teacher")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_describe_measures_each_family_from_its_own_forward(name):
    clip = create_clip(name)
    info = clip.info
    kind, masking = FAMILIES[name]
    assert (info.image.kind, info.image.masking) == (kind, masking)
    assert info.image.attention == (name in ATTENTION_FAMILIES) and info.text.attention  # open_clip text towers
    assert info.sigmoid == (name == "kd-test-sigmoid") == (clip.logit_bias is not None)
    images = torch.randn(2, 3, *image_size(clip.model))
    with torch.no_grad():
        pooled, maps = image_intermediates(clip.model.visual, images, normalize=False)
        torch.testing.assert_close(pooled, clip.model.encode_image(images))  # the same embedding as encode_image
    assert tuple(m.shape[-1] for m in maps) == info.image.layer_widths
    assert maps[-1].shape[1] == 1 + info.image.grid ** 2  # summary token + the final grid
    assert len(info.text.layer_widths) == 2 and info.image.token_width == info.image.layer_widths[-1]


def test_input_patch_masking_keeps_a_quarter_of_the_cells():
    images = torch.ones(3, 3, 64, 64)
    masked = mask_input_patches(images, patch=16, mask_ratio=0.75)
    cells = masked[:, 0].reshape(3, 4, 16, 4, 16).amax(dim=(2, 4))  # (3, 4, 4): 1 kept, 0 masked
    assert cells.sum(dim=(1, 2)).tolist() == [4.0, 4.0, 4.0] and set(masked.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_as_student_trains_with_every_loss_it_can_serve(name, synth_corpus, vit_store, tmp_path):
    """Cached and live targets (tokenfd / dlip need the live teacher), one step, every loss term finite, and the
    run's open_clip_model.safetensors loads into plain open_clip and gives kd-train's own embeddings."""
    losses = [n for n in ALL_LOSSES if name in ATTENTION_FAMILIES or n != "dlip_attn"]
    trainer = train(synth_corpus, tmp_path / "run", student=name, cache=vit_store, losses=",".join(losses))
    last = trainer.run()
    assert all(math.isfinite(last[n]) for n in losses) and last["live_batches"] == 1
    if name == "kd-test-sigmoid":
        assert trainer.student.clip.logit_bias.item() != -10.0  # the sigmoid task loss moved the bias
    plain = open_clip.create_model(name)
    plain.load_state_dict(load_file(tmp_path / "run" / "open_clip_model.safetensors"))
    images = torch.randn(2, 3, *image_size(plain))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval().encode_image(images), trainer.student.clip.eval().encode_image(images))
    result = evaluate_retrieval(f"local-dir:{tmp_path / 'run'}", None, None, str(synth_corpus / "val"), (1, 5),
                                "flat", 16, "cpu", 0, "raise", False)  # what kd-eval retrieval runs
    assert all(0 <= v <= 100 for v in result["metrics"].values() if isinstance(v, float))


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - ATTENTION_FAMILIES))
def test_attention_maps_of_other_families_are_refused_before_any_work(name, synth_corpus, vit_store, tmp_path):
    with pytest.raises(ValueError, match=rf"--losses dlip_attn: the student {name} cannot serve attention maps: "
                                         rf"{FAMILIES[name][0]}"):
        train(synth_corpus, tmp_path / "run", student=name, cache=vit_store, losses="task,dlip_attn")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"kd-test-student"}))
def test_each_family_as_teacher_builds_verifies_and_teaches(name, synth_corpus, store_of, tmp_path):
    """A store of each family's teacher passes verify (its gradients recomputed with its own loss), and a ViT
    student learns from it: cached targets, and the teacher's internals live (tokenfd, dlip)."""
    store = store_of(name)
    report = verify_store(store, shard(synth_corpus), sample=4, pretrained=None, device="cpu", seed=0)
    assert report["ok"], report["lines"]
    last = train(synth_corpus, tmp_path / "run", student="kd-test-student", cache=store,
                 losses="task,fd,icl,crd,gd,tokenfd,dlip").run()
    assert all(math.isfinite(last[n]) for n in ("fd", "icl", "crd", "gd", "tokenfd", "dlip"))


def test_sigmoid_teacher_store_holds_siglip_gradients_and_its_bias(store_of):
    """Stored gradients of a sigmoid teacher equal autograd through open_clip's SigLipLoss on the recorded batches
    (from the stored embeddings), and the store records the teacher's bias."""
    store = CacheStore(store_of("kd-test-sigmoid"))
    teacher = create_clip("kd-test-sigmoid")
    assert store.teacher_logit_bias == pytest.approx(teacher.logit_bias) == pytest.approx(-10.0)
    image, text = (torch.from_numpy(dequantize(store.load(n))) for n in ("image_emb", "text_emb"))
    batches = store.load("grad_batches")
    assert (batches >= 0).any(axis=1).sum() >= 2
    for batch in batches[:3]:
        rows = batch[batch >= 0]
        if not len(rows):
            continue
        i, t = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss = SigLipLoss()(i, t, torch.tensor(store.teacher_logit_scale), torch.tensor(store.teacher_logit_bias))
        g_img, g_txt = torch.autograd.grad(loss, [i, t])
        for name, reference in (("image_grad", g_img), ("text_grad", g_txt)):
            stored = torch.from_numpy(store.to_float(name, store.rows(name, rows)))
            assert float((stored - reference).abs().max() / reference.abs().max()) < 2e-3


def test_gd4_refuses_a_sigmoid_teacher_naming_it(synth_corpus, store_of, tmp_path):
    store = store_of("kd-test-sigmoid")
    with pytest.raises(ValueError, match=r"--losses gd4: teacher main was trained with the sigmoid \(SigLIP\) loss"):
        train(synth_corpus, tmp_path / "run", student="kd-test-student", cache=store, losses="task,gd4")


def test_describe_does_not_change_the_model(synth_corpus):
    clip = create_clip("kd-test-rn")
    before = clip.fingerprint
    clip.model.train()
    describe(clip.model)
    assert clip.model.training and clip.fingerprint == before
    assert np.isfinite(clip.logit_scale)
