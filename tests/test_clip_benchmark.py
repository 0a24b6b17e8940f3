"""kd-eval against CLIP_benchmark's own code.

* Recall@k from its retrieval `evaluate` on the same embeddings: it ranks by `torch.topk` with no tolerance, so
  on data without exact ties both must agree to the last sample, near-ties included.
* Its published webdataset layout, written by its own converter (`clip_benchmark.webdataset_builder`), evaluated
  as it is: `--data <root>`, `test/{0..n-1}.tar` + `nshards.txt`, `.webp` images, `.cls` labels or `.txt`
  captions, `classnames.txt` and `{c}` templates in the root.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from clip_benchmark.metrics import zeroshot_retrieval
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

from evaluation.retrieval import TIE_TOL, faiss_search, retrieval_metrics, torch_search
from evaluation.zeroshot import DEFAULT_TEMPLATE
from evaluation.cli import main
from tests.helpers import save_random_checkpoint

KS = (1, 2, 5)
# CLIP_benchmark's converter hard-codes DataLoader(num_workers=8); torch warns on this 2-core machine
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes:UserWarning")
STUDENT = "kd-test-student"


class PrecomputedEmbeddings(torch.nn.Module):
    """CLIP_benchmark's model interface over embeddings already computed: the 'images' and 'texts' it is fed
    are the embeddings themselves."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        return texts


def clip_benchmark_recalls(image: np.ndarray, captions: list[np.ndarray], ks) -> dict[str, float]:
    """CLIP_benchmark's retrieval `evaluate`, batches of 16 images with their lists of captions."""
    batches = [(torch.from_numpy(image[s:s + 16]), [list(torch.from_numpy(c)) for c in captions[s:s + 16]])
               for s in range(0, len(image), 16)]
    return zeroshot_retrieval.evaluate(PrecomputedEmbeddings(), batches, torch.stack, "cpu", amp=False,
                                       recall_k_list=list(ks))


def near_tie_set(seed: int = 0, n_img: int = 120, dim: int = 32):
    """One caption scattered around each image, plus for the first 40 images a caption that scores its image
    2-9e-6 BELOW another image (above float32 noise, below the old 1e-5 tolerance): a miss at k = 1.

    The near-tie caption t of image i against image j: t ~ (I_i + I_j) / 2 + noise, its component along
    u = I_i - I_j set so that, once normalised, t·I_i - t·I_j = -gap.
    """
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n_img, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    captions = [(image[i] + 0.3 / np.sqrt(dim) * rng.standard_normal(dim))[None] for i in range(n_img)]
    for i, gap in zip(range(40), np.linspace(2e-6, 9e-6, 40)):
        u = image[i] - image[(i + 60) % n_img]
        t = (image[i] + image[(i + 60) % n_img]) / 2 + 0.05 * rng.standard_normal(dim)
        t -= (t @ u) / (u @ u) * u  # now t·I_i = t·I_j exactly
        t -= gap * np.linalg.norm(t) * u / (u @ u)  # t·u / |t| = -gap (|t| moves by O(gap^2))
        captions[i] = np.concatenate([captions[i], t[None]])
    captions = [(c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32) for c in captions]
    return image.astype(np.float32), captions, np.repeat(np.arange(n_img), [len(c) for c in captions])


def decisive_gaps(sim: np.ndarray, positive: np.ndarray, ks) -> np.ndarray:
    """|s+ - s_k| per query and k (s+: best positive score, s_k: k-th best score overall), 0 where s+ is s_k."""
    best = np.where(positive, sim, -np.inf).max(axis=1)
    kth = -np.sort(-sim, axis=1)[:, [k - 1 for k in ks]]
    return np.abs(best[:, None] - kth)


def test_recall_equals_clip_benchmark_on_near_ties():
    image, captions, t2i = near_tie_set()
    text = np.concatenate(captions)
    sim = image.astype(np.float64) @ text.astype(np.float64).T
    positive = t2i[None, :] == np.arange(len(image))[:, None]
    gaps = np.concatenate([decisive_gaps(sim, positive, KS), decisive_gaps(sim.T, positive.T, KS)]).ravel()
    assert not ((gaps > 0) & (gaps < 1.5e-6)).any()  # no decision within float32 noise: ranks are defined
    assert ((gaps > 1.5e-6) & (gaps < 1e-5)).sum() >= 40  # ... but near-ties the old 1e-5 counted as hits
    expected = clip_benchmark_recalls(image, captions, KS)
    ours = retrieval_metrics(image, text, t2i, KS)
    assert {name: ours[name] for name in expected} == expected
    old_rule = retrieval_metrics(image, text, t2i, KS, tie_tol=1e-5)
    assert old_rule["image_retrieval_recall@1"] > expected["image_retrieval_recall@1"]


def test_faiss_and_torch_scores_differ_by_far_less_than_the_tie_tolerance():
    """The float32 noise the tolerance exists for: same pairs, FAISS flat vs torch.topk scores."""
    rng = np.random.default_rng(1)
    database, queries = (rng.standard_normal((n, 512)).astype(np.float32) for n in (2000, 500))
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    faiss_top, torch_top = faiss_search(database, queries, 10), torch_search(database, queries, 10)
    same = faiss_top.ids == torch_top.ids
    noise = np.abs(faiss_top.scores - torch_top.scores)[same].max()
    assert same.mean() > 0.99 and noise < TIE_TOL / 2
    print(f"max |FAISS - torch| score over {int(same.sum())} pairs: {noise:.2e}")


# ---------------------------------------------------------------- CLIP_benchmark's webdataset layout, as published
class LabelledImages(torch.utils.data.Dataset):
    """(PIL image, target) pairs with `.classes` and `.templates`: what CLIP_benchmark's converter reads."""

    def __init__(self, pairs: list, classes: list[str] | None = None, templates: list[str] | None = None):
        self.pairs, self.classes, self.templates = pairs, classes, templates

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return self.pairs[i]


def synth_samples(split: Path) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in sorted(split.glob("*.tar"))], shardshuffle=False).decode("pil"))


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory) -> Path:
    return save_random_checkpoint(STUDENT, tmp_path_factory.mktemp("cb_ckpt") / "student.pt", seed=1)


@pytest.fixture(scope="module")
def benchmark_classification(synth_corpus, tmp_path_factory) -> Path:
    """The synth zero-shot split converted by CLIP_benchmark's own `convert_dataset` (webp, .cls, 3 shards), its
    templates rewritten with CLIP_benchmark's `{c}`."""
    split = synth_corpus / "zeroshot"
    templates = [t.replace("{}", "{c}") for t in (split / "templates.txt").read_text().splitlines() if t]
    dataset = LabelledImages([(s["jpg"], s["json"]["label"]) for s in synth_samples(split)],
                             (split / "classnames.txt").read_text().splitlines(), templates)
    root = tmp_path_factory.mktemp("cb") / "wds_synth_zeroshot"
    convert_dataset(dataset, "test", str(root), transform=PIL_to_bytes("webp"), image_format="webp", max_count=20,
                    verbose=False)
    return root


def kd_eval_json(*args) -> tuple[dict, str]:
    out = Path(tempfile.mkdtemp()) / "result.json"
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--workers", "0", "--output", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text()), result.output


def test_zeroshot_on_a_clip_benchmark_dataset_as_published(synth_corpus, benchmark_classification, student_ckpt):
    root = benchmark_classification
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"
    with tarfile.open(root / "test" / "0.tar") as tar:
        assert {Path(n).suffix for n in tar.getnames()} == {".webp", ".cls"}  # no caption, label in .cls
    published, output = kd_eval_json("zeroshot", "--model", STUDENT, "--checkpoint", student_ckpt, "--data", root)
    assert f"classes from {root / 'classnames.txt'}" in output
    assert f"templates from {root / 'zeroshot_classification_templates.txt'}" in output
    assert published["templates_source"] == str(root / "zeroshot_classification_templates.txt")
    assert all("{c}" in t for t in published["templates"])
    ours, _ = kd_eval_json("zeroshot", "--model", STUDENT, "--checkpoint", student_ckpt,
                           "--data", synth_corpus / "zeroshot")  # this project's layout: .jpg, .json label, {}
    assert published["metrics"] == pytest.approx(ours["metrics"], abs=1e-9)
    assert ours["templates"] == [t.replace("{c}", "{}") for t in published["templates"]]


def test_zeroshot_says_when_it_falls_back_to_the_default_template(benchmark_classification, student_ckpt,
                                                                  tmp_path):
    root = tmp_path / "no_templates"
    shutil.copytree(benchmark_classification, root)
    (root / "zeroshot_classification_templates.txt").unlink()
    result, output = kd_eval_json("zeroshot", "--model", STUDENT, "--checkpoint", student_ckpt, "--data", root)
    assert result["templates_source"] == "default" and result["templates"] == [DEFAULT_TEMPLATE]
    assert "1 templates from default" in output


def test_retrieval_on_a_clip_benchmark_dataset_as_published(synth_corpus, student_ckpt, tmp_path):
    split = synth_corpus / "val"
    dataset = LabelledImages([(s["jpg"], s["txt"].splitlines()) for s in synth_samples(split)])
    convert_retrieval_dataset(dataset, "test", str(tmp_path / "wds_synth_val"), transform=PIL_to_bytes("webp"),
                              image_format="webp", max_count=20, verbose=False)
    published, _ = kd_eval_json("retrieval", "--model", STUDENT, "--checkpoint", student_ckpt,
                                "--data", tmp_path / "wds_synth_val")
    ours, _ = kd_eval_json("retrieval", "--model", STUDENT, "--checkpoint", student_ckpt, "--data", split)
    assert published["metrics"] == pytest.approx(ours["metrics"], abs=1e-9)
