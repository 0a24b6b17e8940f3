"""Cost of the integrity checks on the training path: the CRC32C of every block of a node-local target copy
(stage2_student/targets.py: computed while it is written, checked by local rank 0 at every open under torchrun),
and the CRC32C digest of every sample's bytes (common/corpus.py `Sample.digest`: computed as a sample is read,
compared with the store's `sample_crc32c`).

Target copies: on an N x D float16 array of random unit vectors in a .npy file (the copy's format), blocks of
--chunk-rows rows: the checksums alone over an in-memory array (what writing adds), and the whole open-time check
(`copy_damage`: header, size, every block) from the page cache (the copy was just written; a cold disk reads at
its own speed). Sample digests: over --samples random byte strings of each --sample-bytes size (reading them costs
what it did). Medians over --repeats; reported per million samples.

    python bench/bench_integrity.py --rows 1000000 --dim 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np

import _common as C  # noqa: N812 - also puts the repo on sys.path
from common.cache import CHUNK_ROWS
from stage2_student.targets import block_checksums, checksums_path, copy_damage


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=2000, help="byte strings per --sample-bytes size")
    p.add_argument("--sample-bytes", type=int, nargs="+", default=[4096, 20_000, 100_000])
    C.add_common_args(p)
    args = C.parse_args(p, {"rows": 4096, "dim": 32, "chunk_rows": 1024, "repeats": 1, "samples": 20,
                            "sample_bytes": [4096]})
    results = C.start("integrity checks: target-copy block checksums and sample digests", args)
    values = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    values = (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.npy"
        np.save(path, values)
        checksums_path(path).write_text(json.dumps({"rows_per_block": args.chunk_rows,
                                                    "crc32c": block_checksums(values, args.chunk_rows)}))
        write = median_seconds(lambda: block_checksums(values, args.chunk_rows), args.repeats)
        check = median_seconds(lambda: copy_damage(path, values), args.repeats)
        assert copy_damage(path, values) is None
    per_million = 1e6 / args.rows
    gb = values.nbytes / 1e9
    print(f"{args.rows} x {args.dim} fp16 ({gb:.2f} GB), blocks of {args.chunk_rows} rows: checksums at write "
          f"{write * per_million:.3f} s per million samples ({gb / write:.1f} GB/s); check at open "
          f"{check * per_million:.3f} s per million samples ({gb / check:.1f} GB/s)")
    results |= {"config": vars(args), "target_copy": {"write_s_per_million": write * per_million,
                                                      "check_s_per_million": check * per_million},
                "sample_digests": {}}
    rng = np.random.default_rng(1)
    for size in args.sample_bytes:
        blobs = [rng.bytes(size) for _ in range(args.samples)]
        seconds = median_seconds(lambda blobs=blobs: [google_crc32c.value(b) for b in blobs], args.repeats)
        print(f"sample digests of {size}-byte samples: {seconds * 1e6 / args.samples:.2f} s per million samples "
              f"({size * args.samples / seconds / 1e9:.1f} GB/s)")
        results["sample_digests"][size] = {"s_per_million": seconds * 1e6 / args.samples}
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
