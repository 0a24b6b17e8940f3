"""Retrieval recall@k (FAISS and torch reference), its tie rule and input checks; alignment metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.alignment import alignment_metrics, linear_cka, mean_paired_cosine
from evaluation.retrieval import (TIE_TOL, IndexSpec, default_nlist, faiss_has_gpu, retrieval_metrics,
                              retrieval_metrics_bruteforce)

KS = (1, 5, 10)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def oracle_recalls(image, text, text_to_image, ks, optimistic=True, tie_tol=TIE_TOL) -> dict[str, float]:
    """Independent definition on float64 dense similarities. Optimistic: hit@k iff fewer than k items beat
    the best positive by more than tie_tol; pessimistic: fewer than k other items score >= it - tie_tol."""
    image, text = unit(image).astype(np.float64), unit(text).astype(np.float64)
    sim = image @ text.T  # (N_img, N_txt)
    positive = text_to_image[None, :] == np.arange(len(image))[:, None]
    best_i2t = np.where(positive, sim, -np.inf).max(axis=1)
    best_t2i = sim[text_to_image, np.arange(len(text))]

    def rank(scores, best):
        if optimistic:
            return (scores > best[:, None] + tie_tol).sum(axis=1)
        return (scores >= best[:, None] - tie_tol).sum(axis=1) - 1  # minus the best positive itself

    rank_i2t, rank_t2i = rank(sim, best_i2t), rank(sim.T, best_t2i)
    return {name: value for k in ks for name, value in
            ((f"i2t_R@{k}", float((rank_i2t < k).mean())), (f"t2i_R@{k}", float((rank_t2i < k).mean())))}


def captioned_set(rng, n_img: int, counts: np.ndarray, dim: int = 32, noise: float = 2.5):
    """Images, captions scattered around their image (shuffled), and the caption → image map."""
    image = unit(rng.standard_normal((n_img, dim)))
    t2i = rng.permutation(np.repeat(np.arange(n_img), counts))
    text = unit(image[t2i] + noise / np.sqrt(dim) * rng.standard_normal((len(t2i), dim)))
    return image, text, t2i


def with_ties(rng):
    """Uneven caption counts plus exact duplicates that tie at the top of the rankings."""
    image, text, t2i = captioned_set(rng, 80, rng.integers(1, 8, size=80))
    image[1::10] = image[0::10]  # images 10j+1 duplicate images 10j
    text[t2i == 10] = image[10]  # captions exactly on a duplicated image: text→image top-1 ties 10 vs 11
    text[np.flatnonzero(t2i == 31)[0]] = text[np.flatnonzero(t2i == 30)[0]]  # image→text top-1 ties
    text[5] = text[3]  # duplicated captions (of any images)
    return image, text, t2i


DATASETS = {
    "five_per_image": lambda rng: captioned_set(rng, 100, np.full(100, 5)),
    "uneven_counts": lambda rng: captioned_set(rng, 90, rng.integers(1, 8, size=90)),
    "ties": with_ties,
}


@pytest.mark.parametrize("name", DATASETS)
def test_flat_and_bruteforce_equal_the_rank_counting_oracle(name):
    image, text, t2i = DATASETS[name](np.random.default_rng(0))
    flat = retrieval_metrics(image, text, t2i, ks=KS)
    brute = retrieval_metrics_bruteforce(image, text, t2i, ks=KS)
    assert flat == brute  # exact equality of every value, ties included
    expected = oracle_recalls(image, text, t2i, KS)
    assert {key: flat[key] for key in expected} == expected
    assert 0.0 < flat["i2t_R@1"] < 1.0 and 0.0 < flat["t2i_R@1"] < 1.0  # non-trivial regime
    if name == "ties":  # the duplicates do sit at rank cut-offs, so the tie rule matters here
        assert oracle_recalls(image, text, t2i, KS, optimistic=False) != expected


def test_clip_benchmark_names_alias_the_short_names():
    image, text, t2i = DATASETS["uneven_counts"](np.random.default_rng(1))
    metrics = retrieval_metrics(image, text, t2i, ks=KS)
    for k in KS:
        assert metrics[f"text_retrieval_recall@{k}"] == metrics[f"i2t_R@{k}"]
        assert metrics[f"image_retrieval_recall@{k}"] == metrics[f"t2i_R@{k}"]
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["i2t_R@1"] <= metrics["i2t_R@5"] <= metrics["i2t_R@10"]


def test_hand_built_example():
    # unit vectors at these angles (degrees); images 0°, 90°, 180°; captions of images 0, 0, 1, 2
    def at(degrees):
        radians = np.deg2rad(degrees)
        return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)

    image, text, t2i = at([0, 90, 180]), at([10, 100, 160, 250]), np.array([0, 0, 1, 2])
    # image→text orders: img0: c0 c1 c3 c2 (rank 0); img1: c1 c2 … (rank 1); img2: c2 c3 … (rank 1)
    # text→image orders: c0: I0 (0); c1: I1 I2 I0 (2); c2: I2 I1 (1); c3: I2 (0)
    expected = {"i2t_R@1": 1 / 3, "i2t_R@2": 1.0, "i2t_R@3": 1.0,
                "t2i_R@1": 2 / 4, "t2i_R@2": 3 / 4, "t2i_R@3": 1.0}
    for metrics in (retrieval_metrics(image, text, t2i, ks=(1, 2, 3)),
                    retrieval_metrics_bruteforce(image, text, t2i, ks=(1, 2, 3))):
        assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-12)


def test_ties_are_counted_optimistically():
    # images 0 and 1 are identical, each with a caption equal to the shared embedding: every caption
    # ties between its image and the other one. FAISS returns the higher id first, so without the rule
    # caption 0 would miss at k=1 under FAISS; both backends must count all four as hits.
    image = unit(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    text = image[[0, 1, 2, 3]].copy()
    t2i = np.arange(4)
    for metrics in (retrieval_metrics(image, text, t2i, ks=(1,)),
                    retrieval_metrics_bruteforce(image, text, t2i, ks=(1,))):
        assert metrics["t2i_R@1"] == 1.0
        assert metrics["i2t_R@1"] == 1.0


def test_bruteforce_batching_and_tensor_inputs_do_not_change_results():
    image, text, t2i = DATASETS["ties"](np.random.default_rng(2))
    reference = retrieval_metrics_bruteforce(image, text, t2i, ks=KS)
    assert retrieval_metrics_bruteforce(image, text, t2i, ks=KS, batch_size=7) == reference
    assert retrieval_metrics(torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(t2i), ks=KS) == reference


def clustered_set(rng, n_clusters=40, n_img=800, dim=32):
    """Easy set for approximate search: tight clusters, captions close to their image."""
    centres = unit(rng.standard_normal((n_clusters, dim)))
    image = unit(centres[rng.integers(0, n_clusters, n_img)] + 0.05 * rng.standard_normal((n_img, dim)))
    t2i = np.repeat(np.arange(n_img), 5)
    text = unit(image[t2i] + 0.02 * rng.standard_normal((len(t2i), dim)))
    return image, text, t2i


@pytest.mark.parametrize("index", ["ivf", "hnsw", IndexSpec("ivf", nlist=20, nprobe=4),
                                   IndexSpec("hnsw", hnsw_m=16, ef_construction=64, ef_search=32)])
def test_approximate_indexes_report_high_recall_vs_exact(index):
    image, text, t2i = clustered_set(np.random.default_rng(3))
    metrics = retrieval_metrics(image, text, t2i, ks=KS, index=index)
    exact = retrieval_metrics(image, text, t2i, ks=KS)
    for k in KS:
        for prefix in ("i2t_", "t2i_", ""):
            assert 0.9 < metrics[f"{prefix}index_recall_vs_exact@{k}"] <= 1.0
        assert abs(metrics[f"t2i_R@{k}"] - exact[f"t2i_R@{k}"]) < 0.05
    assert "index_recall_vs_exact@1" not in exact


def test_default_nlist_respects_faiss_training_minimum():
    assert default_nlist(10) == 1
    assert default_nlist(2000) == 2000 // 39
    assert default_nlist(100_000) == round(4 * np.sqrt(100_000))


@pytest.mark.skipif(not faiss_has_gpu(), reason="faiss sees no GPU")
def test_gpu_flat_index_matches_cpu():
    image, text, t2i = DATASETS["ties"](np.random.default_rng(4))
    assert (retrieval_metrics(image, text, t2i, index=IndexSpec(gpu=True))
            == retrieval_metrics(image, text, t2i, index=IndexSpec(gpu=False)))


def test_gpu_required_without_gpu_is_an_error():
    if faiss_has_gpu():
        pytest.skip("a GPU is present")
    image, text, t2i = DATASETS["five_per_image"](np.random.default_rng(5))
    with pytest.raises(ValueError, match="no GPU"):
        retrieval_metrics(image, text, t2i, index=IndexSpec(gpu=True))


def _valid(n_img=12, n_txt=24, dim=8):
    rng = np.random.default_rng(6)
    return (rng.standard_normal((n_img, dim)).astype(np.float32), rng.standard_normal((n_txt, dim)).astype(np.float32),
            np.arange(n_txt) % n_img)


def _with(**changes):
    image, text, t2i = _valid()
    args = {"image_emb": image, "text_emb": text, "text_to_image": t2i, "ks": KS} | changes
    return args


def _nan_text():
    text = _valid()[1].copy()
    text[3, 2] = np.nan
    return text


@pytest.mark.parametrize("args, message", [
    (_with(image_emb=_valid(n_img=7)[0], text_to_image=np.arange(24) % 7), "need at least k=10 images, got 7"),
    (_with(text_emb=_valid()[1][:9], text_to_image=np.arange(9) % 9), "need at least k=10 texts, got 9"),
    (_with(image_emb=np.zeros((0, 8), np.float32)), "image_emb is empty"),
    (_with(text_emb=np.zeros((24, 0), np.float32)), "text_emb is empty"),
    (_with(image_emb=np.ones(8, np.float32)), "2-D"),
    (_with(text_emb=_valid(dim=6)[1]), "dims differ"),
    (_with(text_to_image=np.arange(24) % 12 + 1), r"outside \[0, 12\)"),
    (_with(text_to_image=-(np.arange(24) % 12)), r"outside \[0, 12\)"),
    (_with(text_to_image=np.arange(23) % 12), r"shape \(24,\)"),
    (_with(text_to_image=(np.arange(24) % 12).astype(float)), "integer"),
    (_with(text_to_image=np.arange(24) % 11), "1 images have no caption"),
    (_with(text_emb=_nan_text()), "text_emb contains non-finite"),
    (_with(image_emb=np.zeros((12, 8), np.float32)), "all-zero rows"),
    (_with(ks=()), "non-empty"),
    (_with(ks=(0, 1)), "positive"),
    (_with(index="annoy"), "unknown index kind"),
])
def test_invalid_inputs_raise_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**args)
    if "index" not in args:
        with pytest.raises(ValueError, match=message):
            retrieval_metrics_bruteforce(**args)


# ---------------------------------------------------------------- alignment (embedding-level, used by kd-eval compare)


def test_paired_cosine():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 16))
    assert mean_paired_cosine(x, 3 * x) == pytest.approx(1.0)
    assert mean_paired_cosine(x, -x) == pytest.approx(-1.0)
    assert mean_paired_cosine(x, rng.standard_normal((50, 8))) is None  # different spaces
    with pytest.raises(ValueError, match="same number of rows"):
        mean_paired_cosine(x, x[:-1])


def test_linear_cka_matches_gram_definition_and_invariances():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((40, 12)), rng.standard_normal((40, 7))
    y = y + x[:, :7]  # partly aligned
    centring = np.eye(40) - 1 / 40
    gx, gy = centring @ x @ x.T @ centring, centring @ y @ y.T @ centring
    hsic_definition = np.sum(gx * gy) / np.sqrt(np.sum(gx * gx) * np.sum(gy * gy))
    assert linear_cka(x, y) == pytest.approx(hsic_definition, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert linear_cka(x, 2.5 * x @ rotation + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.standard_normal((40, 7))) < linear_cka(x, y)
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(x, np.ones((40, 3)))


def test_alignment_metrics_accept_tensors():
    student = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    metrics = alignment_metrics(student, student.double())
    assert metrics == pytest.approx({"paired_cosine": 1.0, "linear_cka": 1.0})
