"""Synthetic captions: the CoCa captioner (common/captioner.py) and the `caption` loss that trains one with kd-train."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from common.captioner import caption_images
from common.corpus import Corpus
from common.models import LoadedCLIP, create_clip
from stage2_student.losses import LossSet, TeacherTargets
from stage2_student.student import Student, loss_dims
from stage2_student.train import Trainer, TrainOptions

COCA = "kd-test-coca"


@pytest.fixture(scope="module")
def coca() -> LoadedCLIP:
    return create_clip(COCA)


@pytest.fixture(scope="module")
def images(synth_corpus, coca) -> torch.Tensor:
    samples = Corpus.open(str(synth_corpus / "val")).read(0, 3)
    return torch.stack([coca.preprocess(s.image) for s in samples])


def test_captions_are_num_strings_per_image_and_seeded(coca, images):
    coca.model.train()  # create_clip gives eval mode; a captioner in training (kd-train) gets its mode back
    captions = caption_images(coca, images, num=4, seed=0)
    assert len(captions) == 3 and all(len(per_image) == 4 for per_image in captions)
    assert all(isinstance(c, str) and c.strip() for per_image in captions for c in per_image)
    assert not any(marker in c for per_image in captions for c in per_image
                   for marker in ("<start_of_text>", "<end_of_text>"))
    assert caption_images(coca, images, num=4, seed=0) == captions
    assert caption_images(coca, images, num=4, seed=1) != captions
    assert coca.model.training  # the captioner's mode is given back


def test_a_random_init_coca_does_not_depend_on_what_memory_held_before(coca):
    """open_clip leaves the CoCa decoder's text_projection `torch.empty`: the factory gives it a seeded value, so a
    random-init captioner is the same model (and writes finite logits) however the process used its memory."""
    projection = coca.model.text_decoder.text_projection
    for _ in range(3):  # freed NaN blocks of the projection's size: what the allocator hands back to torch.empty
        junk = torch.full(projection.shape, float("nan"))
        del junk
        again = create_clip(COCA)
        assert again.fingerprint == coca.fingerprint
        assert torch.equal(again.model.text_decoder.text_projection, projection)
    assert torch.isfinite(projection).all() and 0.5 < float(projection.detach().std()) * 48 ** 0.5 < 1.5


def test_captioning_refuses_a_model_that_is_not_a_coca(images):
    with pytest.raises(ValueError, match="kd-test-student is a CLIP, not a captioner"):
        caption_images(create_clip("kd-test-student"), images, num=2, seed=0)


def test_caption_loss_is_the_cross_entropy_of_the_cocas_own_forward(coca, images):
    texts = ["a red square", "a small pink triangle to the left of a medium striped white diamond", "a star"]
    tokens = coca.tokenizer(texts)
    student = Student(coca, {})
    losses = LossSet("task,caption", loss_dims(coca, None, None))
    outputs = student(images, tokens, losses.student_needs)
    _, terms = losses(outputs, TeacherTargets())
    reference = coca.model(images, tokens)  # open_clip's CoCa forward, as open_clip.loss.CoCaLoss reads it
    expected = F.cross_entropy(reference["logits"].permute(0, 2, 1), reference["labels"],
                               ignore_index=coca.model.pad_id)
    assert terms["caption"] == pytest.approx(expected.item(), rel=1e-5)
    assert losses.weights["caption"] == 2.0
    # the towers ran once for both the embeddings and the captions: the same raw embeddings as encode_*
    assert torch.allclose(outputs.image_emb, coca.model.encode_image(images, normalize=False), atol=1e-6)
    assert torch.allclose(outputs.text_emb, coca.model.encode_text(tokens, normalize=False), atol=1e-6)


def _options(synth_corpus: Path, out: Path, student: str) -> TrainOptions:
    return TrainOptions(data=str(synth_corpus / "train"), out=str(out), student=student, losses="task,caption",
                        batch_size=32, steps=3, warmup=1, workers=0, log_every=1)


def test_kd_train_refuses_caption_for_a_student_that_is_not_a_coca(synth_corpus, tmp_path):
    with pytest.raises(ValueError, match="--losses caption: the student kd-test-student cannot serve captions: a CLIP "
                                         "writes none"):
        Trainer(_options(synth_corpus, tmp_path, "kd-test-student"))


def test_kd_train_trains_a_captioner_that_plain_open_clip_loads(synth_corpus, tmp_path, coca, images):
    last = Trainer(_options(synth_corpus, tmp_path, COCA)).run()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["caption"] < metrics[0]["caption"] and last["step"] == 3
    # plain open_clip loads the run folder
    plain = open_clip.create_model(f"local-dir:{tmp_path}")
    assert isinstance(plain, open_clip.CoCa)
    trained = create_clip(COCA, str(tmp_path / "open_clip_model.safetensors"))
    captions = caption_images(dataclasses.replace(trained, model=plain), images, num=2, seed=0)
    assert captions == caption_images(trained, images, num=2, seed=0)
    assert captions != caption_images(coca, images, num=2, seed=0)  # the weights did change
