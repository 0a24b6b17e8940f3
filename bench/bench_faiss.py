"""Retrieval-evaluation speed: FAISS exact search vs brute-force torch, and approximate indexes at scale.

Data: random unit image embeddings (images = captions / 5), each caption a noisy copy of its image,
re-normalised, float32. Part 1 times `retrieval_metrics` (IndexFlatIP) against
`retrieval_metrics_bruteforce` (torch.topk) end to end, both directions, and checks the metrics agree.
Part 2, at the largest size, builds IVF and HNSW indexes over the full databases and reports build
time, and search time and neighbour recall against exact search at k=10 (on a random subset of queries,
both directions) for a few nprobe / efSearch values. Random data has no cluster structure, the hard
case for IVF/HNSW: read their recall here as a worst case, not a prediction for real CLIP embeddings.
With --device cuda, part 1 also searches with FAISS flat on the GPU (when this faiss build has one) and runs
the torch brute force there.

    python bench/bench_faiss.py --sizes 5000 25000 100000 --dim 512 --threads 2
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

import _common as C  # noqa: N812 - also puts the repo on sys.path
from evaluation.retrieval import (IndexSpec, TopK, build_index, faiss_has_gpu, faiss_search, neighbour_recall,
                              retrieval_metrics, retrieval_metrics_bruteforce)

CAPTIONS_PER_IMAGE = 5
K = 10
# --tiny: two small sets at D = 16, one nprobe and one efSearch on 100 queries
TINY = {"sizes": [500, 1000], "dim": 16, "nprobe": [4], "ef_search": [16], "ann_queries": 100}


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


def exact_backends(device: str) -> dict:
    """Part 1's searches: FAISS flat on the CPU, on the GPU (with --device cuda, when faiss has one), and torch
    brute force on --device."""
    flat = lambda gpu: lambda *a: retrieval_metrics(*a, index=IndexSpec("flat", gpu=gpu))  # noqa: E731
    backends = {"faiss flat cpu": flat(False)}
    if device == "cuda":
        if faiss_has_gpu():
            backends["faiss flat gpu"] = flat(True)
        else:
            print("faiss flat gpu: skipped, this faiss build has no GPU support (install faiss-gpu)")
    return backends | {f"torch topk {device}": lambda *a: retrieval_metrics_bruteforce(*a, device=device)}


def bench_exact(sizes: list[int], dim: int, device: str) -> list[dict]:
    """Part 1: end-to-end recall@{1,5,10}, both directions, with each exact backend; the metrics must agree."""
    backends = exact_backends(device)
    runs = []
    for n in sizes:
        image, text, t2i = make_set(n, dim)
        done = {name: timed(search, image, text, t2i) for name, search in backends.items()}
        metrics = [m for m, _ in done.values()]
        runs.append({"captions": n, "images": len(image), "seconds": {name: s for name, (_, s) in done.items()},
                     "equal": all(m == metrics[0] for m in metrics), "metrics": metrics[0]})
    first = next(iter(backends))
    C.print_table(["captions", "images", *(f"{name} s" for name in backends), f"time / {first}", "equal",
                   "i2t_R@1", "t2i_R@1"],
                  [[r["captions"], r["images"], *r["seconds"].values(),
                    " ".join(f"{s / r['seconds'][first]:.2f}" for s in r["seconds"].values()),
                    "yes" if r["equal"] else "NO", r["metrics"]["i2t_R@1"], r["metrics"]["t2i_R@1"]] for r in runs],
                  f"exact retrieval, both directions, D={dim}")
    return runs


def search_both(image_queries: np.ndarray, text_queries: np.ndarray, indexes) -> tuple[TopK, TopK]:
    """Image→text and text→image top-K with prebuilt (text index, image index)."""
    return TopK(*indexes[0].search(image_queries, K)), TopK(*indexes[1].search(text_queries, K))


def bench_approximate(n: int, dim: int, n_queries: int, nprobes: list[int], ef_searches: list[int]) -> list[dict]:
    """Part 2: IVF / HNSW build time (full database), search time and recall@K vs exact on a random
    subset of `n_queries` queries per direction (recall estimates are within ~1% from 5k queries)."""
    image, text, _ = make_set(n, dim)
    rng = np.random.default_rng(1)
    queries = (image[rng.choice(len(image), min(n_queries, len(image)), replace=False)],
               text[rng.choice(len(text), min(n_queries, len(text)), replace=False)])
    flat = IndexSpec("flat", gpu=False)
    exact, t_exact = timed(lambda: (faiss_search(text, queries[0], K, flat), faiss_search(image, queries[1], K, flat)))
    runs = [{"index": "flat (exact)", "build_s": 0.0, "search_s": t_exact, "i2t_recall": 1.0, "t2i_recall": 1.0}]
    for kind, param, values in (("ivf", "nprobe", nprobes), ("hnsw", "efSearch", ef_searches)):
        spec = IndexSpec(kind, gpu=False)
        indexes, t_build = timed(lambda: (build_index(text, spec), build_index(image, spec)))
        shape = (f"nlist={indexes[0].nlist} (texts) / {indexes[1].nlist} (images)" if kind == "ivf"
                 else f"M={spec.hnsw_m} efConstruction={spec.ef_construction}")
        for value in values:
            for index in indexes:
                faiss.ParameterSpace().set_index_parameter(index, param, value)
            approx, t_search = timed(search_both, *queries, indexes)
            recall = [float(neighbour_recall(a, e, K).mean()) for a, e in zip(approx, exact)]
            runs.append({"index": f"{kind} {shape} {param}={value}", "build_s": t_build, "search_s": t_search,
                         "i2t_recall": recall[0], "t2i_recall": recall[1]})
    C.print_table(["index", "build_s", "search_s", "speedup", "i2t_recall", "t2i_recall"],
                  [[r["index"], r["build_s"], r["search_s"], t_exact / r["search_s"], r["i2t_recall"],
                    r["t2i_recall"]] for r in runs],
                  f"approximate indexes: database {n} captions / {len(image)} images, D={dim}, k={K}, "
                  f"{len(queries[0])} image + {len(queries[1])} caption queries")
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 25000, 100000], help="caption counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256], help="IVF nprobe values")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256], help="HNSW efSearch values")
    parser.add_argument("--ann-queries", type=int, default=5000, help="queries per direction for IVF/HNSW")
    parser.add_argument("--skip-approximate", action="store_true")
    C.add_common_args(parser)  # --threads: FAISS's too
    return C.parse_args(parser, TINY, argv)


def main() -> None:
    args = parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = C.start("retrieval evaluation: FAISS vs torch brute force", args)
    print(f"faiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}, GPUs seen by faiss: "
          f"{faiss.get_num_gpus()}")
    results |= {"config": vars(args), "faiss": faiss.__version__, "exact": bench_exact(args.sizes, args.dim,
                                                                                        args.device)}
    if not args.skip_approximate:
        results["approximate"] = bench_approximate(max(args.sizes), args.dim, args.ann_queries, args.nprobe,
                                                   args.ef_search)
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
