"""kd-eval against CLIP_benchmark's own code: recall@k from its retrieval `evaluate` on the same embeddings.

CLIP_benchmark (`clip_benchmark.metrics.zeroshot_retrieval`) ranks by `torch.topk` with no tolerance, so on data
without exact ties both must agree to the last sample, near-ties included.
"""
from __future__ import annotations

import numpy as np
import torch
from clip_benchmark.metrics import zeroshot_retrieval

from common.retrieval import TIE_TOL, faiss_search, retrieval_metrics, torch_search

KS = (1, 2, 5)


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
