"""How the data layer grows with corpus size: index build and open, memory per process and per DataLoader worker,
kd-train start, gradient windows, and store bytes per sample (with checksums), extrapolated to CC12M.

    python bench/bench_scale.py --sizes 100000 400000 1600000 --json bench/results/scale.json

Corpora are tiny-image webdataset shards of 10k samples (16x16 JPEG, a caption, a json; 9-digit keys, as
img2dataset writes them): the point is the sample count. Each measurement that needs a fresh process runs in one
(`python -c`), so that memory figures are that process's alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import REPO, parse_args, print_header, synthetic_index  # noqa: E402

SHARD = 10_000
CC12M = 11_000_000
# --tiny: one corpus of 500 samples, one single-process run per target kind, a small window and one-chunk stores
TINY = {"sizes": [500], "ranks": [1], "dim": 64, "window_rows": 1024, "grad_batch": 256, "store_rows": 2048}


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_corpus(root: Path, n: int) -> None:
    """n samples in shards of SHARD; skipped when already there."""
    images = [jpeg(i) for i in range(16)]
    root.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, n, SHARD)):
        path = root / f"{shard:05d}.tar"
        if path.exists():
            continue
        tmp = path.with_suffix(".partial")
        with tarfile.open(tmp, "w") as tar:
            for i in range(first, min(first + SHARD, n)):
                for ext, data in (("jpg", images[i % 16]), ("txt", f"a photo number {i}".encode()),
                                  ("json", json.dumps({"key": f"{i:09d}"}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)


PROBE = r'''
import json, os, resource, sys, time
t0 = time.perf_counter()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
base = rss()
from common.corpus import Corpus
imported = rss()
t1 = time.perf_counter()
corpus = Corpus.open(sys.argv[1])
t2 = time.perf_counter()
out = {"open_s": t2 - t1, "rss_index": rss() - imported, "rss_total": rss(), "index_nbytes": corpus.index.nbytes,
       "samples": corpus.num_samples}
if sys.argv[2] == "workers":
    import numpy as np, torch
    from torch.utils.data import DataLoader, Dataset
    def pss(pid):
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    class Rows(Dataset):
        def __len__(self): return 64
        def __getitem__(self, i):
            rows = np.random.default_rng(i).integers(0, corpus.num_samples, 32)
            return len(corpus.read_rows(rows)) + os.getpid() * 0
    loader = DataLoader(Rows(), batch_size=None, num_workers=2, persistent_workers=True)
    it = iter(loader)
    for _ in range(32):
        next(it)
    workers = [w.pid for w in it._workers]
    out["pss_main"] = pss(os.getpid())
    out["pss_workers"] = [pss(p) for p in workers]
print(json.dumps(out))
'''


def probe(spec: str, mode: str, cache_dir: str) -> dict:
    env = {**os.environ, "KD_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, spec, mode], cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - start}


def train_start(spec: str, cache_dir: str, out_dir: str) -> float:
    """Seconds from `kd-train` start to its first metrics line (baseline run: no cache, 2 workers)."""
    env = {**os.environ, "KD_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stage2_student.cli", "--data", spec, "--out", out_dir, "--student",
                    "kd-test-student", "--losses", "task", "--batch-size", "32", "--steps", "1", "--workers", "2",
                    "--warmup", "1", "--log-every", "1"], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def gradient_window(dim: int, rows: int, grad_batch: int) -> dict:
    """One gradient window of `rows` rows at width `dim` (what each rank holds at a time): seconds, bytes."""
    import torch
    from common.contrastive import clip_loss_grads
    rng = np.random.default_rng(0)
    emb = lambda: torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((rows, dim), np.float32)), dim=-1)  # noqa: E731
    image, text = emb().half().float(), emb().half().float()
    start = time.perf_counter()
    perm = torch.from_numpy(rng.permutation(rows))
    g_i, g_t = torch.zeros_like(image), torch.zeros_like(text)
    for b in range(0, rows, grad_batch):
        idx = perm[b:b + grad_batch]
        g_i[idx], g_t[idx] = clip_loss_grads(image[idx], text[idx], 100.0)
    seconds = time.perf_counter() - start
    # fp16 relative error of the stored, scaled gradients against the fp32 ones
    scale = grad_batch / 100.0
    err = float(((g_i * scale).half().float() / scale - g_i).abs().max() / g_i.abs().max())
    return {"rows": rows, "dim": dim, "seconds": seconds, "rows_per_s": rows / seconds,
            "window_bytes": 4 * rows * dim * 4, "fp16_scaled_grad_max_rel_error": err}


def store_bytes(dim: int, rows: int, dtype: str, grads: bool, tmp: Path) -> dict:
    """Bytes per sample of a real store layout at width `dim` (random unit rows written through the cache API),
    its write and read throughput, and a full integrity pass."""
    from common.cache import CacheStore, create_store, quantize
    from stage1_teacher.inspect import disk_bytes, integrity_lines
    index = synthetic_index(rows)
    chunk = 2048
    attrs = {"format_version": 2, "teacher": {}, "corpus": {"num_samples": rows, "shards": index.shard_identities()},
             "embed_dim": dim, "teacher_logit_scale": 100.0,
             "grad_scale": 10.24 if grads else None, "invalid_count": 0,
             "build": {"dtype": dtype, "views": 0, "chunk_rows": chunk, "grads": grads, "window_blocks": 4,
                       "grad_batch": 1024}}
    path = tmp / f"store-{dtype}-{grads}-{dim}.zarr"
    group = create_store(str(path), attrs, index)
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((rows, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    start = time.perf_counter()
    group["image_emb"][:] = quantize(unit, dtype)
    group["text_emb"][:] = quantize(unit, dtype)
    group["valid"][:] = True
    group["sample_crc32c"][:] = 0  # a synthetic index: no sample is read
    if grads:
        group["image_grad"][:] = unit.astype(np.float16)
        group["text_grad"][:] = unit.astype(np.float16)
        batches = group["grad_batches"]
        full = np.full(batches.shape, -1, np.int64)
        full.flat[:rows] = np.arange(rows)
        batches[:] = full
    group["blocks_done"][:] = True
    write_s = time.perf_counter() - start
    group.attrs.update({"complete": True})
    size, files = disk_bytes(str(path))
    store = CacheStore(str(path))
    start = time.perf_counter()
    for name in ("image_emb", "text_emb") + (("image_grad", "text_grad") if grads else ()):
        store.load(name)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    ok, _ = integrity_lines(store)
    verify_s = time.perf_counter() - start
    return {"dim": dim, "dtype": dtype, "grads": grads, "rows": rows, "bytes_per_sample": size / rows,
            "files": files, "write_MBps": size / write_s / 1e6, "read_MBps": size / read_s / 1e6,
            "verify_s_per_million_rows": verify_s / rows * 1e6, "integrity_ok": ok}


def synthetic_store(spec: str, out: Path, cache_dir: str) -> dict:
    """A complete store over the real corpus index with random unit targets (no teacher pass: a CPU build of 1.6M
    samples would take hours); shaped like kd-test-teacher's (D = 48), without gradients."""
    os.environ["KD_CACHE_DIR"] = cache_dir
    from common.cache import create_store
    from common.corpus import Corpus
    from common.models import create_clip
    from stage1_teacher.build import BuildOptions, store_attrs
    corpus = Corpus.open(spec)
    teacher = create_clip("kd-test-teacher")
    opts = BuildOptions(teacher="kd-test-teacher", data=spec, out=str(out), grads=False)
    attrs = store_attrs(opts, teacher, corpus)
    group = create_store(str(out), attrs, corpus.index)
    rng = np.random.default_rng(0)
    rows = opts.chunk_rows
    for start in range(0, corpus.num_samples, rows):
        n = min(rows, corpus.num_samples - start)
        for name in ("image_emb", "text_emb"):
            unit = rng.standard_normal((n, teacher.embed_dim)).astype(np.float32)
            group[name][start:start + n] = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(np.float16)
        group["valid"][start:start + n] = True
    group["sample_crc32c"][:] = corpus.digests()  # what the build records, so reads check the real bytes
    group["blocks_done"][:] = True
    group.attrs.update({"initialized": True, "complete": True, "invalid_count": 0})
    return {"targets_bytes": 2 * corpus.num_samples * teacher.embed_dim * 2, "dim": teacher.embed_dim}


def process_tree_pss(root: int) -> int:
    """PSS of a process and all its descendants (torchrun, its ranks, their DataLoader workers)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def ranks_run(ranks: int, spec: str, store: Path | None, cache_dir: str, out: Path) -> dict:
    """kd-train with `ranks` processes on this node (2 DataLoader workers each), from the cache (task + FD) or,
    without a store, plain CLIP (the memory of everything but the targets): peak PSS of all of them, and seconds
    from launch to the first metrics line (every rank has started: step 1 gathers them all)."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"] if ranks > 1 else [])
    targets = ["--cache", str(store), "--losses", "task,fd"] if store else ["--losses", "task"]
    cmd = launcher + ["-m", "stage2_student.cli", *targets, "--data", spec, "--out", str(out),
                      "--student", "kd-test-student", "--batch-size", str(32 * ranks),
                      "--steps", "3", "--workers", "2", "--warmup", "1", "--log-every", "1"]
    subprocess.run(["rm", "-rf", str(out)])
    env = {**os.environ, "KD_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, first_step = 0, None
    while proc.poll() is None:
        peak = max(peak, process_tree_pss(proc.pid))
        if first_step is None and (out / "metrics.jsonl").exists():
            first_step = time.perf_counter() - start
        time.sleep(0.2)
    log = proc.stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(log[-2000:])
    ready = [float(m) for m in re.findall(r"rank \d+ ready in ([0-9.]+) s", log)]
    return {"ranks": ranks, "targets": bool(store), "peak_pss_MB": peak / 2**20, "first_step_s": first_step,
            "rank_setup_s": ready,
            "total_s": time.perf_counter() - start}


def fit(sizes, values) -> tuple[float, float]:
    """Least-squares a + b·N."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "kd-bench-scale"))
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 2, 4],
                        help="kd-train process counts to run on the largest corpus (the first 2 makes the node copy)")
    parser.add_argument("--ranks-only", action="store_true",
                        help="only the rank runs, on the largest size's corpus from an earlier run")
    parser.add_argument("--dim", type=int, default=512, help="width of the gradient window and the stores")
    parser.add_argument("--window-rows", type=int, default=8192, help="rows of the gradient window")
    parser.add_argument("--grad-batch", type=int, default=1024, help="gradient batch of the window")
    parser.add_argument("--store-rows", type=int, default=20_480, help="rows of the real-layout stores")
    parser.add_argument("--json", metavar="PATH")
    args = parse_args(parser, TINY)
    root = Path(args.root)
    results = print_header("growth with corpus size: index, memory, kd-train start, ranks, stores", "cpu")
    results["sizes"] = {}
    for n in [] if args.ranks_only else args.sizes:
        corpus = root / f"corpus-{n}"
        t = time.perf_counter()
        write_corpus(corpus, n)
        written_s = time.perf_counter() - t
        cache_dir = str(root / f"kdcache-{n}")
        subprocess.run(["rm", "-rf", cache_dir])
        first = probe(str(corpus), "open", cache_dir)  # scans the shards, writes the sidecar
        again = probe(str(corpus), "workers", cache_dir)  # loads the sidecar
        start = train_start(str(corpus), cache_dir, str(root / f"run-{n}"))
        subprocess.run(["rm", "-rf", str(root / f"run-{n}")])
        row = {"samples": first["samples"], "write_corpus_s": written_s,
               "index_build_s": first["open_s"], "open_s": again["open_s"],
               "index_bytes_per_sample": again["index_nbytes"] / n, "rss_index_MB": again["rss_index"] / 2**20,
               "rss_process_MB": again["rss_total"] / 2**20, "pss_main_MB": again["pss_main"] / 2**20,
               "pss_workers_MB": [p / 2**20 for p in again["pss_workers"]], "train_first_step_s": start}
        results["sizes"][n] = row
        print(json.dumps({n: row}))
    sizes = sorted(results["sizes"])
    extrapolated = {}
    for key in ("index_build_s", "open_s", "rss_index_MB", "train_first_step_s", "pss_workers_MB") if sizes else ():
        values = [np.mean(results["sizes"][n][key]) for n in sizes]
        a, b = fit(sizes, values) if len(sizes) > 1 else (0.0, values[0] / sizes[0])
        extrapolated[key] = {"fixed": a, "per_million": b * 1e6, "at_11M": a + b * CC12M}
    results["extrapolated_11M"] = extrapolated
    if args.ranks:
        n = max(args.sizes)
        spec, cache_dir = str(root / f"corpus-{n}"), str(root / f"kdcache-{n}")
        store = root / f"store-{n}.zarr"
        subprocess.run(["rm", "-rf", str(store), str(Path(cache_dir) / "targets")])
        results["rank_store"] = synthetic_store(spec, store, cache_dir)
        runs = []
        for ranks in args.ranks:
            for with_store in (None, store):
                out = root / f"run-ranks-{ranks}-{'cache' if with_store else 'plain'}"
                runs.append(ranks_run(ranks, spec, with_store, cache_dir, out))
                print(json.dumps(runs[-1]))
        results["ranks"] = runs
    with tempfile.TemporaryDirectory() as tmp:
        results["gradient_window"] = gradient_window(args.dim, args.window_rows, args.grad_batch)
        results["stores"] = [store_bytes(args.dim, args.store_rows, "fp16", True, Path(tmp)),
                             store_bytes(args.dim, args.store_rows, "int8", False, Path(tmp))]
    print(json.dumps({k: results[k] for k in ("extrapolated_11M", "gradient_window", "stores")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
