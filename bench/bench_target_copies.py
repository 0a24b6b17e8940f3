"""Cost of checking node-local target copies (stage2_student/targets.py): the CRC32C of every block of a copy,
computed while it is written and checked by local rank 0 at every open under torchrun.

On an N x D float16 array of random unit vectors in a .npy file (the copy's format), blocks of --chunk-rows rows:
the checksums alone over an in-memory array (what writing adds), and the whole open-time check (`copy_damage`:
header, size, every block) from the page cache (the copy was just written; a cold disk reads at its own speed).
Medians over --repeats; reported per million samples at this D.

    python bench/bench_target_copies.py --rows 1000000 --dim 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C  # noqa: N812, F401 - also puts the repo on sys.path
from common.cache import CHUNK_ROWS
from stage2_student.targets import block_checksums, checksums_path, copy_damage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    values = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    values = (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "copy.npy"
        np.save(path, values)
        checksums_path(path).write_text(json.dumps({"rows_per_block": args.chunk_rows,
                                                    "crc32c": block_checksums(values, args.chunk_rows)}))

        def median_seconds(fn) -> float:
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return float(np.median(times))

        write = median_seconds(lambda: block_checksums(values, args.chunk_rows))
        check = median_seconds(lambda: copy_damage(path, values))
        assert copy_damage(path, values) is None
    per_million = 1e6 / args.rows
    gb = values.nbytes / 1e9
    print(f"{args.rows} x {args.dim} fp16 ({gb:.2f} GB), blocks of {args.chunk_rows} rows: checksums at write "
          f"{write * per_million:.3f} s per million samples ({gb / write:.1f} GB/s); check at open "
          f"{check * per_million:.3f} s per million samples ({gb / check:.1f} GB/s)")


if __name__ == "__main__":
    main()
