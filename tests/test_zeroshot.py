"""Zero-shot classifier construction (prompt ensembling), accuracy metrics, file readers and reporting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.zeroshot import (build_classifier, fill_template, format_table, read_classnames, read_templates,
                             result_json, templates_for, zeroshot_metrics)

CLASSNAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]


class TableEncoder:
    """Deterministic stand-in for tokenise+encode: a fixed random vector per prompt, with an arbitrary
    norm so that per-prompt normalisation matters; records the batch sizes it was called with."""

    def __init__(self, prompts: list[str], dim: int = 16):
        generator = torch.Generator().manual_seed(0)
        vectors = torch.randn(len(prompts), dim, generator=generator)
        norms = torch.rand(len(prompts), 1, generator=generator) * 10 + 0.1
        self.table = dict(zip(prompts, vectors * norms))
        self.batches: list[int] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.batches.append(len(prompts))
        return torch.stack([self.table[p] for p in prompts])


@pytest.fixture
def encoder() -> TableEncoder:
    return TableEncoder([t.format(c) for c in CLASSNAMES for t in TEMPLATES])


def test_classifier_is_normalised_mean_of_normalised_prompts(encoder):
    weights = build_classifier(encoder, CLASSNAMES, TEMPLATES)
    assert weights.shape == (3, 16) and weights.dtype == torch.float32
    assert torch.allclose(weights.norm(dim=1), torch.ones(3), atol=1e-6)
    for row, name in zip(weights, CLASSNAMES):
        prompts = torch.stack([encoder.table[t.format(name)] for t in TEMPLATES])
        expected = F.normalize(F.normalize(prompts, dim=1).mean(dim=0), dim=0)
        assert torch.allclose(row, expected, atol=1e-6)


def test_classifier_encodes_in_batches_without_changing_the_result(encoder):
    reference = build_classifier(encoder, CLASSNAMES, TEMPLATES)
    encoder.batches.clear()
    batched = build_classifier(encoder, CLASSNAMES, TEMPLATES, batch_size=4)
    assert encoder.batches == [4, 4, 1]  # 9 prompts
    assert torch.allclose(batched, reference, atol=1e-6)


def test_classifier_rejects_bad_inputs(encoder):
    with pytest.raises(ValueError, match="placeholder"):
        build_classifier(encoder, CLASSNAMES, ["a photo"])
    with pytest.raises(ValueError, match="at least one"):
        build_classifier(encoder, [], TEMPLATES)


def one_hot_classifier(n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)


def test_metrics_on_hand_built_imbalanced_example():
    # identity classifier: an image's logits are proportional to its own coordinates
    images = np.array([
        [9, 1, 2, 3, 4, 5],  # class 0: true class ranked 1st
        [5, 9, 1, 2, 3, 4],  # class 0: 2nd
        [1, 9, 8, 7, 6, 5],  # class 0: 6th
        [8, 1, 1, 1, 1, 1],  # class 0: 1st
        [9, 3, 8, 7, 6, 5],  # class 1: 6th
        [1, 2, 3, 4, 5, 6],  # class 1: 5th
        [1, 1, 9, 1, 1, 1],  # class 2: 1st
    ], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    metrics = zeroshot_metrics(images, labels, one_hot_classifier(6))
    # top-1 per class: 2/4, 0/2, 1/1 (classes 3-5 absent, so not averaged)
    assert metrics == pytest.approx({"acc1": 3 / 7, "acc5": 5 / 7, "mean_per_class_recall": (0.5 + 0.0 + 1.0) / 3})


def test_ties_with_the_true_class_count_as_correct():
    images = np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32)  # argmax alone would pick class 0 / class 1
    metrics = zeroshot_metrics(images, np.array([1, 2]), one_hot_classifier(3))
    assert metrics["acc1"] == 1.0


def test_acc5_uses_all_classes_when_fewer_than_five():
    images = np.array([[0, 0, 1], [1, 0, 0], [0.2, 1, 0.1]], dtype=np.float32)
    metrics = zeroshot_metrics(torch.from_numpy(images), torch.tensor([0, 0, 1]), torch.eye(3))
    assert metrics["acc5"] == 1.0  # top-3 of 3 classes
    assert metrics["acc1"] == pytest.approx(2 / 3)
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 1) / 2)


def test_end_to_end_with_built_classifier(encoder):
    weights = build_classifier(encoder, CLASSNAMES, TEMPLATES)
    images = weights[[0, 1, 2, 2]] + 0.01 * torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    metrics = zeroshot_metrics(images, [0, 1, 2, 2], weights)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


@pytest.mark.parametrize("labels, n_classes, dim, message", [
    ([0, 3], 3, 4, r"\[0, 3\)"),
    ([0, -1], 3, 4, r"\[0, 3\)"),
    ([0], 3, 4, r"shape \(2,\)"),
    ([0.0, 1.0], 3, 4, "integer"),
    ([0, 1], 3, 5, "dims differ"),
])
def test_metrics_reject_bad_inputs(labels, n_classes, dim, message):
    images = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        zeroshot_metrics(images, np.array(labels), np.ones((n_classes, dim), dtype=np.float32))


def test_readers(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\n\n  dog \ncar\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n{} in the wild\n")
    assert read_classnames(tmp_path / "classes.txt") == ["cat", "dog", "car"]
    assert read_templates(tmp_path / "templates.txt") == ["a photo of a {}.", "{} in the wild"]


def test_both_placeholder_styles_fill_the_class_name(tmp_path):
    """CLIP_benchmark's templates use {c}, this project's {}; both read and give the same prompts."""
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c} in the wild\n")
    (tmp_path / "classnames.txt").write_text("cat\n")
    found = templates_for(tmp_path / "classnames.txt")
    assert found.source == str(tmp_path / "zeroshot_classification_templates.txt")
    assert [fill_template(t, "cat") for t in found.templates] == [fill_template(t, "cat") for t in TEMPLATES[::2]]


@pytest.mark.parametrize("reader, text, message", [
    (read_classnames, "\n \n", "no class names"),
    (read_classnames, "cat\ndog\ncat\n", r"duplicated class names \['cat'\]"),
    (read_templates, "a photo of a {}.\na photo\n", "no '{}' placeholder"),
    (read_templates, "a {} of a {}\n", "one-slot"),
    (read_templates, "a {} of {name}\n", "one-slot"),
    (read_templates, "a {c} of a {}\n", "one-slot"),
])
def test_readers_reject_bad_files(tmp_path, reader, text, message):
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        reader(path)


def test_result_json_shape_and_serialisable():
    metrics = {"acc1": np.float32(0.5), "acc5": torch.tensor(0.75), "mean_per_class_recall": 0.25}
    result = result_json("cifar10", "ViT-T-16", "kd-student.pt", "zeroshot_classification", metrics)
    assert set(result) == {"dataset", "model", "pretrained", "task", "metrics"}
    assert json.loads(json.dumps(result))["metrics"] == {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.25}


def test_format_table():
    table = format_table({"acc1": 0.123456, "paired_cosine": None, "n": 3})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value", "(%)"]
    assert lines[2].split() == ["acc1", "12.3"]  # percent with one decimal (was 0.1235: one unit in tables)
    assert lines[3].split() == ["paired_cosine", "n/a"]
    assert lines[4].split() == ["n", "3"]
    assert format_table({}) == "(no metrics)"
