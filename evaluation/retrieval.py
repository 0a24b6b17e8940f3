"""Image↔text retrieval recall@k over embeddings, with FAISS (exact or approximate) and a torch reference.

Metric names follow CLIP_benchmark, values are fractions in [0, 1]:
  * ``text_retrieval_recall@k``  (alias ``i2t_R@k``): image queries; an image is a hit when ANY of its
    captions is in its top-k texts.
  * ``image_retrieval_recall@k`` (alias ``t2i_R@k``): caption queries; a caption is a hit when its image
    is in its top-k images.
Approximate indexes (``ivf``, ``hnsw``) also report ``{i2t,t2i}_index_recall_vs_exact@k`` and their
query-weighted mean ``index_recall_vs_exact@k``: the fraction of the exact top-k neighbours they return.

Tie rule (optimistic, identical for every backend): with s⁺ the query's best positive score, an item
ranks above the positive only if its score exceeds s⁺ by more than ``tie_tol``; hit@k iff fewer than k
items rank above. Equal scores therefore never push a positive out of the top k, whatever order a
backend returns ties in (FAISS flat returns them in decreasing id order, ``torch.topk`` in no specified
order). ``tie_tol`` absorbs only the float32 rounding differences between backends' dot products, so that
duplicated embeddings tie in every backend: scores are cosines of unit vectors (scale 1), FAISS and torch
scores of the same pair differ by at most 2.4e-7 (measured, ``tests/test_clip_benchmark.py``), and a
tolerance of 1e-6 leaves every score gap above it ranked as CLIP_benchmark ranks it. It is evaluated from a
backend's top-k list alone: hit@k iff a positive is among the first k results, or s⁺ equals the k-th score
to within ``tie_tol``; for exact search that is the rank-counting rule above, for approximate search it scores
what the index returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import faiss
import numpy as np
import torch

TIE_TOL = 1e-6  # 1e-6 of the cosine scale: ~4x the FAISS-vs-torch float32 noise (<= 2.4e-7), nothing more
IndexKind = Literal["flat", "ivf", "hnsw"]
ALIAS_PREFIXES = ("i2t_R@", "t2i_R@")  # short names of text_retrieval_recall@k / image_retrieval_recall@k


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS inner-product index to search with, and its knobs.

    nlist: IVF cells (None: ``default_nlist(n)``); nprobe: IVF cells visited per query;
    hnsw_m / ef_construction / ef_search: HNSW graph degree and beam widths;
    gpu: None = use a GPU when faiss has one, True = require one, False = stay on CPU (HNSW always CPU).
    """

    kind: IndexKind = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 40  # the FAISS default; build time grows about linearly with it
    ef_search: int = 128
    gpu: bool | None = None


class TopK(NamedTuple):
    """Search result: scores (Q, k) in decreasing order and database ids (Q, k); id -1 = nothing found."""

    scores: np.ndarray
    ids: np.ndarray


class _Pairs(NamedTuple):
    image: np.ndarray  # (N_img, D) unit float32
    text: np.ndarray  # (N_txt, D) unit float32
    text_to_image: np.ndarray  # (N_txt,) int64 in [0, N_img)


# ---------------------------------------------------------------- input checks


def as_unit_float32(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Validate an (N, D) embedding matrix and return it L2-normalised, C-contiguous float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero rows; they cannot be normalised")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _check_text_to_image(text_to_image, n_txt: int, n_img: int) -> np.ndarray:
    """Validate the caption → image mapping; every image needs at least one caption."""
    t2i = np.asarray(text_to_image.cpu() if isinstance(text_to_image, torch.Tensor) else text_to_image)
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},) (one entry per caption), got {t2i.shape}")
    if not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    bad = (t2i < 0) | (t2i >= n_img)
    if bad.any():
        raise ValueError(f"text_to_image has {int(bad.sum())} entries outside [0, {n_img}), "
                         f"e.g. caption {int(np.argmax(bad))} -> {int(t2i[np.argmax(bad)])}")
    orphans = np.setdiff1d(np.arange(n_img), t2i)
    if orphans.size:
        raise ValueError(f"{orphans.size} images have no caption (e.g. image {int(orphans[0])}); "
                         "image->text recall is undefined for them")
    return t2i.astype(np.int64)


def _check_ks(ks: Sequence[int], n_img: int, n_txt: int) -> tuple[int, ...]:
    """Validate the recall cut-offs against the number of searchable items."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    for count, what in ((n_img, "images"), (n_txt, "texts")):
        if count < max(ks):
            raise ValueError(f"need at least k={max(ks)} {what}, got {count}")
    return ks


def _prepare(image_emb, text_emb, text_to_image, ks) -> tuple[_Pairs, tuple[int, ...]]:
    """Validate all inputs of a retrieval evaluation and normalise the embeddings."""
    image = as_unit_float32(image_emb, "image_emb")
    text = as_unit_float32(text_emb, "text_emb")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"embedding dims differ: image_emb has D={image.shape[1]}, text_emb has D={text.shape[1]}")
    ks = _check_ks(ks, len(image), len(text))
    return _Pairs(image, text, _check_text_to_image(text_to_image, len(text), len(image))), ks


# ---------------------------------------------------------------- FAISS indexes


def default_nlist(n: int) -> int:
    """IVF cell count ~4·sqrt(n), capped so every cell gets the >= 39 training points FAISS asks for."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _cpu_index(database: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build (and for IVF, train) a CPU inner-product index holding `database`."""
    n, dim = database.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "ivf":
        nlist = spec.nlist or default_nlist(n)
        if not 1 <= nlist <= n:
            raise ValueError(f"IVF needs 1 <= nlist <= number of vectors ({n}), got nlist={nlist}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(database)
        index.nprobe = min(spec.nprobe, nlist)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        raise ValueError(f"unknown index kind {spec.kind!r}; expected 'flat', 'ivf' or 'hnsw'")
    index.add(database)
    return index


def build_index(database: np.ndarray, spec: IndexSpec = IndexSpec()) -> faiss.Index:
    """Inner-product index over unit float32 vectors, moved to GPU 0 when `spec.gpu` asks and faiss can."""
    index = _cpu_index(database, spec)
    if spec.gpu is True and not faiss_has_gpu():
        raise ValueError("IndexSpec(gpu=True) but this faiss build sees no GPU")
    if spec.gpu is False or spec.kind == "hnsw" or not faiss_has_gpu():  # faiss has no GPU HNSW
        return index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)  # copies nprobe along with the data
    gpu_index.referenced_objects = [resources]  # keep the GPU memory pool alive as long as the index
    return gpu_index


def faiss_search(database: np.ndarray, queries: np.ndarray, k: int, spec: IndexSpec = IndexSpec()) -> TopK:
    """Top-k database items per query by inner product (FAISS tiles queries × database internally,
    so no dense (Q, N) matrix is ever materialised)."""
    scores, ids = build_index(database, spec).search(queries, k)
    return TopK(scores, ids)


def torch_search(database: np.ndarray, queries: np.ndarray, k: int, batch_size: int | None = None,
                 device: str | torch.device = "cpu") -> TopK:
    """Brute-force reference: `torch.topk` over the similarity matrix, one block of query rows at a time."""
    db = torch.from_numpy(database).to(device)
    batch_size = batch_size or max(1, 2**26 // len(database))  # ~256 MB of float32 scores per block
    scores, ids = [], []
    for start in range(0, len(queries), batch_size):
        block = torch.from_numpy(queries[start:start + batch_size]).to(device) @ db.T
        top = torch.topk(block, k, dim=1)
        scores.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return TopK(torch.cat(scores).numpy(), torch.cat(ids).numpy())


# ---------------------------------------------------------------- metrics


def _best_positive_scores(pairs: _Pairs, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """s⁺ per image query (best of its captions) and per caption query (its image), in float32."""
    t2i = pairs.text_to_image
    caption = np.concatenate([np.einsum("ij,ij->i", pairs.image[t2i[s:s + chunk]], pairs.text[s:s + chunk])
                              for s in range(0, len(t2i), chunk)])
    image = np.full(len(pairs.image), -np.inf, dtype=np.float32)
    np.maximum.at(image, t2i, caption)
    return image, caption


def hits_at_k(top: TopK, retrieved_labels: np.ndarray, query_labels: np.ndarray, best_positive: np.ndarray,
              k: int, tie_tol: float = TIE_TOL) -> np.ndarray:
    """Boolean hit@k per query under the module's tie rule.

    retrieved_labels: (Q, >=k) positive-group label of each returned item (-1 for none); a returned item is
    a positive when its label equals the query's label.
    """
    found = (retrieved_labels[:, :k] == query_labels[:, None]).any(axis=1)
    tied_at_cutoff = np.abs(best_positive - top.scores[:, k - 1]) <= tie_tol
    return found | tied_at_cutoff


def _recalls(pairs: _Pairs, i2t: TopK, t2i: TopK, ks: tuple[int, ...], tie_tol: float) -> dict[str, float]:
    """Recall@k both ways from the image→text and text→image search results."""
    best_img, best_txt = _best_positive_scores(pairs)
    # label of a retrieved text = its image; -1 ids (nothing found) must not wrap around to the last caption
    text_labels = np.where(i2t.ids >= 0, pairs.text_to_image[i2t.ids], -1)
    image_queries = np.arange(len(pairs.image))
    metrics = {}
    for k in ks:
        r_i2t = float(hits_at_k(i2t, text_labels, image_queries, best_img, k, tie_tol).mean())
        r_t2i = float(hits_at_k(t2i, t2i.ids, pairs.text_to_image, best_txt, k, tie_tol).mean())
        metrics |= {f"text_retrieval_recall@{k}": r_i2t, f"image_retrieval_recall@{k}": r_t2i,
                    f"i2t_R@{k}": r_i2t, f"t2i_R@{k}": r_t2i}
    return metrics


def without_aliases(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics under CLIP_benchmark's names only: each recall once, for tables (JSON keeps both names)."""
    return {name: value for name, value in metrics.items() if not name.startswith(ALIAS_PREFIXES)}


def neighbour_recall(approx: TopK, exact: TopK, k: int) -> np.ndarray:
    """Per query, the fraction of the exact top-k ids that the approximate search returned in its top k."""
    return (approx.ids[:, :k, None] == exact.ids[:, None, :k]).any(axis=2).mean(axis=1)


def _index_recalls(pairs: _Pairs, approx: tuple[TopK, TopK], spec: IndexSpec,
                   ks: tuple[int, ...]) -> dict[str, float]:
    """Approximation cost of an index: neighbour recall against exact flat search, per direction and pooled."""
    flat = IndexSpec("flat", gpu=spec.gpu)
    exact = (faiss_search(pairs.text, pairs.image, max(ks), flat), faiss_search(pairs.image, pairs.text, max(ks), flat))
    metrics = {}
    for k in ks:
        per_query = [neighbour_recall(a, e, k) for a, e in zip(approx, exact)]
        metrics |= {f"i2t_index_recall_vs_exact@{k}": float(per_query[0].mean()),
                    f"t2i_index_recall_vs_exact@{k}": float(per_query[1].mean()),
                    f"index_recall_vs_exact@{k}": float(np.concatenate(per_query).mean())}
    return metrics


def retrieval_metrics(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10),
                      index: IndexKind | IndexSpec = "flat", tie_tol: float = TIE_TOL) -> dict[str, float]:
    """Recall@k for image→text and text→image retrieval, searched with FAISS.

    image_emb (N_img, D), text_emb (N_txt, D): numpy arrays or tensors, normalised here;
    text_to_image (N_txt,): image index of each caption; index: 'flat' | 'ivf' | 'hnsw' or an IndexSpec.
    Raises ValueError on malformed inputs (see module docstring for metric names and the tie rule).
    """
    pairs, ks = _prepare(image_emb, text_emb, text_to_image, ks)
    spec = IndexSpec(index) if isinstance(index, str) else index
    searches = (faiss_search(pairs.text, pairs.image, max(ks), spec),
                faiss_search(pairs.image, pairs.text, max(ks), spec))
    metrics = _recalls(pairs, *searches, ks, tie_tol)
    if spec.kind != "flat":
        metrics |= _index_recalls(pairs, searches, spec, ks)
    return metrics


def retrieval_metrics_bruteforce(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10),
                                 tie_tol: float = TIE_TOL, batch_size: int | None = None,
                                 device: str | torch.device = "cpu") -> dict[str, float]:
    """Reference for `retrieval_metrics`: same inputs, checks and outputs, searched by `torch.topk`."""
    pairs, ks = _prepare(image_emb, text_emb, text_to_image, ks)
    i2t = torch_search(pairs.text, pairs.image, max(ks), batch_size, device)
    t2i = torch_search(pairs.image, pairs.text, max(ks), batch_size, device)
    return _recalls(pairs, i2t, t2i, ks, tie_tol)
