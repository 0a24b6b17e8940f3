"""Chunk size and compressor for the cache's per-sample arrays (common/cache.py: CHUNK_ROWS, no compressor).

For each chunk size (rows per chunk, chunked along the sample axis only, as the cache does) and compressor
(none, or Blosc zstd clevel 1 byte-shuffle) on an N x D float16 array of L2-normalised random embeddings:
write MB/s, full-read MB/s, random-batch reads (rows/s for batches of --batch random rows, chunk-aware: each
needed chunk is read whole, then the rows picked; and, for comparison, zarr's own `oindex` on the same rows),
bytes on disk, compression ratio and file count. Configurations are interleaved (rotated each round) and each
round rewrites the array into a fresh directory; medians over --repeats rounds. Reads are from the page cache
(the file was just written): cold-disk reads are slower, and more so for many small files.

Random unit vectors are close to the worst case for compression; real embeddings compress about as poorly
(fp16 mantissas of dense, whitened-looking features are high-entropy; only exponent bytes repeat).

    python bench/bench_cache_chunks.py --rows 200000 --dim 512
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

import _common as C  # noqa: N812 - also puts the repo on sys.path
from common.cache import CHUNK_ROWS

MB = 1e6
# --tiny: a 2000 x 16 array, two chunk sizes, every compressor, one round
TINY = {"rows": 2000, "dim": 16, "chunk_rows": [256, 1024], "batch": 32, "batches": 2, "repeats": 1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    p.add_argument("--compressors", nargs="+", choices=("none", "crc32c", "blosc"), default=["none", "crc32c", "blosc"])
    p.add_argument("--batch", type=int, default=256, help="rows per random batch")
    p.add_argument("--batches", type=int, default=6, help="random batches per configuration and round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write the arrays (default: a temp dir; put it on the disk you care about)")
    C.add_common_args(p)
    return C.parse_args(p, TINY)


def embeddings(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """L2-normalised Gaussian rows as float16 (what the cache stores with --dtype fp16)."""
    x = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def compressors(name: str):
    """The bytes-to-bytes codecs of a variant: `crc32c` is the checksum every store chunk carries now."""
    return {"none": None, "crc32c": [Crc32cCodec()],
            "blosc": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]}[name]


def write(path: Path, data: np.ndarray, chunk_rows: int, compressor: str) -> zarr.Array:
    array = zarr.create_array(str(path), shape=data.shape, chunks=(chunk_rows, data.shape[1]), dtype=data.dtype,
                              compressors=compressors(compressor), fill_value=0)
    array[...] = data
    return array


def read_rows_by_chunk(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows (any order) by reading each chunk they fall in whole, once."""
    chunk_rows = array.chunks[0]
    out = np.empty((len(rows), array.shape[1]), array.dtype)
    chunk_of = rows // chunk_rows
    for chunk in np.unique(chunk_of):
        pick = np.flatnonzero(chunk_of == chunk)
        block = array[chunk * chunk_rows:(chunk + 1) * chunk_rows]
        out[pick] = block[rows[pick] - chunk * chunk_rows]
    return out


def random_batches(rows: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(rows, batch, replace=False) for _ in range(count)]


def measure(path: Path, data: np.ndarray, chunk_rows: int, compressor: str, batches: list[np.ndarray],
            device: str) -> dict:
    """Seconds to write, read whole, and read the random batches (both ways) of one configuration."""
    shutil.rmtree(path, ignore_errors=True)
    array = None

    def do_write():
        nonlocal array
        array = write(path, data, chunk_rows, compressor)

    to_device = (lambda x: torch.from_numpy(x).to(device)) if device != "cpu" else (lambda x: x)  # noqa: E731
    result = {"write_s": C.timed(do_write)}
    full = {}
    result["read_s"] = C.timed(lambda: full.setdefault("x", array[...]))
    if not (np.array_equal(full["x"], data) and np.array_equal(read_rows_by_chunk(array, batches[0]),
                                                                 data[batches[0]])):
        raise AssertionError(f"chunk_rows={chunk_rows} {compressor}: read back differs")
    result["chunked_batch_s"] = C.timed(lambda: [to_device(read_rows_by_chunk(array, b)) for b in batches],
                                        device) / len(batches)
    result["oindex_batch_s"] = C.timed(lambda: [to_device(array.oindex[b]) for b in batches], device) / len(batches)
    result["disk_bytes"], result["files"] = C.disk_usage(path)
    result["chunks_per_batch"] = float(np.mean([len(np.unique(b // chunk_rows)) for b in batches]))
    return result


def run(args, root: Path) -> dict[tuple[int, str], list[dict]]:
    """All configurations, interleaved round by round (rotated), each round with its own random batches."""
    data = embeddings(args.rows, args.dim)
    configs = [(c, comp) for comp in args.compressors for c in args.chunk_rows]
    runs: dict[tuple[int, str], list[dict]] = {cfg: [] for cfg in configs}
    for r in range(args.repeats):
        batches = random_batches(args.rows, args.batch, args.batches, seed=r)
        shift = r % len(configs)
        for chunk_rows, comp in configs[shift:] + configs[:shift]:
            runs[(chunk_rows, comp)].append(measure(root / "array.zarr", data, chunk_rows, comp, batches,
                                                    args.device))
    shutil.rmtree(root / "array.zarr", ignore_errors=True)
    return runs


def report(args, runs: dict, results: dict) -> None:
    logical = args.rows * args.dim * 2
    print(f"\nN={args.rows} D={args.dim} float16 ({logical / MB:.0f} MB logical), random batches of {args.batch} "
          f"rows x {args.batches} per round, {args.repeats} rounds; current CHUNK_ROWS={CHUNK_ROWS}, no compressor")
    rows, out = [], []
    for (chunk_rows, comp), seen in runs.items():
        med = {k: C.median([s[k] for s in seen]) for k in seen[0]}
        row = {"chunk_rows": chunk_rows, "compressor": comp, "write_MBps": logical / MB / med["write_s"],
               "read_MBps": logical / MB / med["read_s"],
               "batch_rows_per_s_chunked": args.batch / med["chunked_batch_s"],
               "batch_rows_per_s_oindex": args.batch / med["oindex_batch_s"],
               "chunks_per_batch": med["chunks_per_batch"],
               "MB_decoded_per_batch": med["chunks_per_batch"] * chunk_rows * args.dim * 2 / MB,
               "compression_ratio": logical / med["disk_bytes"], "files": int(med["files"]),
               "raw": seen}
        out.append(row)
        rows.append([chunk_rows, comp, row["write_MBps"], row["read_MBps"], row["batch_rows_per_s_chunked"],
                     row["batch_rows_per_s_oindex"], row["chunks_per_batch"], row["MB_decoded_per_batch"],
                     row["compression_ratio"], row["files"],
                     " ".join(f"{s['write_s']:.2f}" for s in seen), " ".join(f"{s['read_s']:.2f}" for s in seen)])
    C.print_table(["chunk_rows", "compressor", "write_MB/s", "read_MB/s", "batch_rows/s", "oindex_rows/s",
                   "chunks/batch", "MB_read/batch", "compr_ratio", "files", "raw_write_s", "raw_read_s"], rows,
                  "medians (MB/s of logical float16 bytes; batch_rows/s: chunk-aware reads of whole chunks; "
                  "oindex_rows/s: zarr's array.oindex[rows])")
    results.update({"config": vars(args), "logical_bytes": logical, "configs": out})


def main() -> None:
    args = parse_args()
    results = C.start("cache chunk size and compressor", args)
    with tempfile.TemporaryDirectory(prefix="bench-chunks-", dir=args.dir) as tmp:
        runs = run(args, Path(tmp))
    report(args, runs, results)
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
