"""Retrieval-evaluation speed: FAISS exact search vs brute-force torch, and approximate indexes at scale.

Data: random unit image embeddings (images = captions / 5), each caption a noisy copy of its image,
re-normalised, float32. Part 1 times `retrieval_metrics` (IndexFlatIP) against
`retrieval_metrics_bruteforce` (torch.topk) end to end, both directions, and checks the metrics agree.
Part 2, at the largest size, builds IVF and HNSW indexes over the full databases and reports build
time, and search time and neighbour recall against exact search at k=10 (on a random subset of queries,
both directions) for a few nprobe / efSearch values. Random data has no cluster structure, the hard
case for IVF/HNSW: read their recall here as a worst case, not a prediction for real CLIP embeddings.

    python bench/bench_faiss.py --sizes 5000 25000 100000 --dim 512 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from common.retrieval import (IndexSpec, TopK, build_index, faiss_search, neighbour_recall,  # noqa: E402
                              retrieval_metrics, retrieval_metrics_bruteforce)

CAPTIONS_PER_IMAGE = 5
K = 10


def make_set(n_captions: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit images; captions = their image + isotropic noise of norm ≈ 6 (cos ≈ 0.16), re-normalised;
    and the caption → image map."""
    rng = np.random.default_rng(seed)
    n_images = n_captions // CAPTIONS_PER_IMAGE
    image = rng.standard_normal((n_images, dim), dtype=np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    t2i = np.repeat(np.arange(n_images), CAPTIONS_PER_IMAGE)
    text = image[t2i] + 6.0 / np.sqrt(dim) * rng.standard_normal((n_captions, dim), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text, t2i


def timed(fn, *args, **kwargs):
    """(result, wall seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_exact(sizes: list[int], dim: int) -> None:
    """Part 1: end-to-end recall@{1,5,10} with FAISS flat vs torch brute force."""
    print(f"\n== exact retrieval, both directions, D={dim} ==")
    print(f"{'captions':>9} {'images':>7} {'faiss_flat_s':>12} {'torch_topk_s':>12} {'torch/faiss':>11} "
          f"{'equal':>5} {'i2t_R@1':>7} {'t2i_R@1':>7}")
    for n in sizes:
        image, text, t2i = make_set(n, dim)
        flat, t_flat = timed(retrieval_metrics, image, text, t2i)
        brute, t_brute = timed(retrieval_metrics_bruteforce, image, text, t2i)
        print(f"{n:>9} {len(image):>7} {t_flat:>12.2f} {t_brute:>12.2f} {t_brute / t_flat:>11.2f} "
              f"{'yes' if flat == brute else 'NO':>5} {flat['i2t_R@1']:>7.4f} {flat['t2i_R@1']:>7.4f}")


def search_both(image_queries: np.ndarray, text_queries: np.ndarray, indexes) -> tuple[TopK, TopK]:
    """Image→text and text→image top-K with prebuilt (text index, image index)."""
    return TopK(*indexes[0].search(image_queries, K)), TopK(*indexes[1].search(text_queries, K))


def bench_approximate(n: int, dim: int, n_queries: int, nprobes: list[int], ef_searches: list[int]) -> None:
    """Part 2: IVF / HNSW build time (full database), search time and recall@K vs exact on a random
    subset of `n_queries` queries per direction (recall estimates are within ~1% from 5k queries)."""
    image, text, _ = make_set(n, dim)
    rng = np.random.default_rng(1)
    queries = (image[rng.choice(len(image), min(n_queries, len(image)), replace=False)],
               text[rng.choice(len(text), min(n_queries, len(text)), replace=False)])
    flat = IndexSpec("flat", gpu=False)
    exact, t_exact = timed(lambda: (faiss_search(text, queries[0], K, flat), faiss_search(image, queries[1], K, flat)))
    print(f"\n== approximate indexes: database {n} captions / {len(image)} images, D={dim}, k={K}, "
          f"{len(queries[0])} image + {len(queries[1])} caption queries ==")
    print(f"{'index':<22} {'build_s':>8} {'search_s':>8} {'speedup':>7} {'i2t_recall':>10} {'t2i_recall':>10}")
    print(f"{'flat (exact)':<22} {0.0:>8.2f} {t_exact:>8.2f} {1.0:>7.2f} {1.0:>10.4f} {1.0:>10.4f}")
    for kind, param, values in (("ivf", "nprobe", nprobes), ("hnsw", "efSearch", ef_searches)):
        spec = IndexSpec(kind, gpu=False)
        indexes, t_build = timed(lambda: (build_index(text, spec), build_index(image, spec)))
        shape = (f"nlist={indexes[0].nlist} (texts) / {indexes[1].nlist} (images)" if kind == "ivf"
                 else f"M={spec.hnsw_m} efConstruction={spec.ef_construction}")
        print(f"-- {kind} {shape}")
        for value in values:
            for index in indexes:
                faiss.ParameterSpace().set_index_parameter(index, param, value)
            approx, t_search = timed(search_both, *queries, indexes)
            recall = [neighbour_recall(a, e, K).mean() for a, e in zip(approx, exact)]
            print(f"{f'{kind} {param}={value}':<22} {t_build:>8.2f} {t_search:>8.2f} {t_exact / t_search:>7.2f} "
                  f"{recall[0]:>10.4f} {recall[1]:>10.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 25000, 100000], help="caption counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="FAISS/torch threads (default: library default)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256], help="IVF nprobe values")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256], help="HNSW efSearch values")
    parser.add_argument("--ann-queries", type=int, default=5000, help="queries per direction for IVF/HNSW")
    parser.add_argument("--skip-approximate", action="store_true")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, threads faiss={faiss.omp_get_max_threads()} "
          f"torch={torch.get_num_threads()}, GPUs seen by faiss: {faiss.get_num_gpus()}")
    bench_exact(args.sizes, args.dim)
    if not args.skip_approximate:
        bench_approximate(max(args.sizes), args.dim, args.ann_queries, args.nprobe, args.ef_search)


if __name__ == "__main__":
    main()
