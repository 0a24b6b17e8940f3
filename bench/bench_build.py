"""Stage one: `build_cache` throughput against the teacher's forward alone, on the same batches.

The build decodes and renders samples (DataLoader workers), runs the teacher, buffers and writes whole blocks,
then computes gradients. Ideally all of it hides behind the teacher: build samples/s / teacher-only samples/s
-> 1 (goal >= 0.95). The teacher-only variant runs `encode_batch` (teacher.embed_images + embed_texts) on the
very batches the build's dataset yields, decoded and preprocessed into memory beforehand. Variants are timed
interleaved, --repeats rounds, medians reported. Two more views of each build, from inside it: the teacher-pass
rate build_cache logs (its loop alone: no model/store creation, no gradients), and the share of the build's
wall time spent inside `encode_batch` (timed by wrapping it in this process; the build code is unchanged).
Also the store's bytes per sample on disk and file count (fp16 as built; fp32 as the same arrays re-written
through `create_store` with dtype fp32: same layout, no second teacher pass), and optionally a cProfile.

    python bench/bench_build.py --samples 2000 --workers 0 1 2 --repeats 3
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import zarr

import _common as C  # noqa: N812 - also puts the repo on sys.path
import stage1_teacher.build as build
from common.cache import CHUNK_ROWS, create_store
from common.index import read_index
from common.storage import remove_tree
from common.corpus import Corpus
from common.models import create_clip
from stage1_teacher.build import BlockBatches, BuildOptions, build_cache, encode_batch

# pstats restriction for the cumulative view: the build's own steps and where the loop waits for data
REPO_FUNCTIONS = r"build\.py|models\.py:.*(create_clip|fingerprint|embed)|cache\.py|corpus\.py:.*(open|read)|" \
                 r"contrastive\.py|dataloader\.py:.*__next__|views\.py:.*render"


class BuildProbe(logging.Handler):
    """Runs builds and watches them from inside: catches build_cache's closing log line (teacher-pass
    samples/s) and sums the seconds spent in `encode_batch` (wrapped in this process)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.loop_rate: float | None = None
        self.teacher_s = 0.0
        logger = logging.getLogger("kd-cache")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        logger.propagate = False  # keep build's own log lines out of the tables
        build.encode_batch = self.timed_encode

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("wrote %s") and len(record.args) >= 4:
            self.loop_rate = float(record.args[3])

    def timed_encode(self, teacher, batch):
        start = time.perf_counter()
        try:
            return encode_batch(teacher, batch)
        finally:
            self.teacher_s += time.perf_counter() - start

    def run(self, opts: BuildOptions, seen: list[dict]) -> None:
        """One fresh build (the variant's previous store is removed first, inside the timing: a few ms);
        appends {loop_samples_per_s, teacher_s} to `seen`."""
        remove_tree(opts.out)
        self.loop_rate, self.teacher_s = None, 0.0
        with C.quiet_stderr():
            build_cache(opts)
        seen.append({"loop_samples_per_s": self.loop_rate, "teacher_s": self.teacher_s})


# --tiny: the test models, a corpus of 4 blocks, two worker counts and the profile, one round
TINY = {"teacher": "kd-test-teacher", "samples": 64, "batch_size": 16, "workers": [0, 1], "image_size": 32,
        "chunk_rows": 16, "repeats": 1, "profile": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="kd-demo-teacher")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="build variants, one per count")
    p.add_argument("--views", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="corpus image side (the teacher resizes)")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="build block = store chunk rows")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians over them)")
    p.add_argument("--profile", type=int, metavar="WORKERS", help="cProfile one extra build with WORKERS workers")
    C.add_common_args(p)
    return C.parse_args(p, TINY, argv)


def pre_render(opts: BuildOptions, teacher) -> tuple[list[dict], float]:
    """All batches of the build, decoded and preprocessed in this process and put on the teacher's device (the
    bare forward then pays no decode and no host-to-device copy), and the seconds that took."""
    corpus = Corpus.open(opts.data)
    blocks = list(range(-(-corpus.num_samples // opts.chunk_rows)))
    device = next(teacher.model.parameters()).device
    on_device = lambda b: b | {"images": b["images"].to(device), "tokens": b["tokens"].to(device)}  # noqa: E731
    batches: list[dict] = []
    seconds = C.timed(lambda: batches.extend(map(on_device, BlockBatches(corpus, blocks, opts, teacher))),
                      opts.device)
    return batches, seconds


def rewrite_as_fp32(src: Path, dst: Path) -> None:
    """The store at src re-written with fp32 embeddings through create_store (the build's layout)."""
    group = zarr.open_group(str(src), mode="r")
    attrs = dict(group.attrs)
    attrs["build"] = {**attrs["build"], "dtype": "fp32"}
    out = create_store(str(dst), attrs, read_index(group["index"]))
    for name in group.array_keys():
        out[name][...] = group[name][...]


def profile_build(opts: BuildOptions, top: int = 25) -> str:
    """cProfile of one build in this process (with workers > 0 it sees only the main process): the top
    functions by own time, then this repo's build steps (and the DataLoader) by cumulative time."""
    remove_tree(opts.out)
    profiler = cProfile.Profile()
    with C.quiet_stderr():
        profiler.runcall(build_cache, opts)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(REPO_FUNCTIONS, top)
    return out.getvalue()


def store_sizes(stores: dict[str, Path], samples: int) -> list[list]:
    """Rows: store, disk bytes, bytes/sample, file count."""
    rows = []
    for name, path in stores.items():
        size, files = C.disk_usage(path)
        rows.append([name, size, round(size / samples, 1), files])
    return rows


def report(args, times: dict, seen: dict, render_s: float, sizes: list[list], results: dict) -> None:
    n = args.samples
    forward = C.median(times["teacher forward only"])
    print(f"\nsamples={n} batch_size={args.batch_size} views={args.views} chunk_rows={args.chunk_rows} "
          f"(blocks={-(-n // args.chunk_rows)}: a worker decodes whole blocks, so at most that many workers are "
          f"busy) repeats={args.repeats}\nteacher {results['teacher']}")
    print(f"decode+render of all batches, serial in one process: {render_s:.2f} s ({n / render_s:.0f} samples/s)")
    rows = []
    for name, raw in times.items():
        med = C.median(raw)
        row = [name, " ".join(f"{t:.2f}" for t in raw), med, n / med, forward / med,
               C.paired_ratio(times["teacher forward only"], raw)]
        if name in seen:
            loop = C.median([s["loop_samples_per_s"] for s in seen[name]])
            inside = C.median([s["teacher_s"] / t for s, t in zip(seen[name], raw)])
            row += [loop, loop / (n / forward), inside]
        rows.append(row + [""] * (9 - len(row)))
    C.print_table(["variant", "raw_s", "median_s", "samples/s", "ratio_vs_fwd", "paired", "loop_samples/s",
                   "loop_ratio", "teacher_share"], rows,
                  "throughput. ratio_vs_fwd = build samples/s / teacher-only samples/s, end to end (of medians; "
                  "paired: median of per-round ratios); loop = build's teacher pass alone (from its log; ratio vs "
                  "the median forward); teacher_share = time inside encode_batch / build wall time")
    print(f"CPU-bound ceiling with decoding in the loop or competing for the same cores: forward / (forward + "
          f"serial decode+render) = {forward / (forward + render_s):.3f}")
    C.print_table(["store", "disk_bytes", "bytes/sample", "files"], sizes, "store on disk")
    results.update({
        "config": vars(args), "times_s": times, "inside_builds": seen, "render_serial_s": render_s,
        "ratios_vs_forward": {k: forward / C.median(v) for k, v in times.items()},
        "store_sizes": [dict(zip(["store", "disk_bytes", "bytes_per_sample", "files"], r)) for r in sizes],
    })


def measure(args, data: Path, tmp: Path, results: dict) -> Path:
    """Builds of `data` (one per --workers count) and the teacher's forward on the same batches, interleaved;
    prints the tables, fills `results`, returns the first variant's store (under tmp)."""
    probe = BuildProbe()
    base = BuildOptions(teacher=args.teacher, data=str(data), out="", batch_size=args.batch_size,
                        views=args.views, device=args.device, chunk_rows=args.chunk_rows)
    teacher = create_clip(args.teacher, device=args.device)
    teacher.model.eval()
    results["teacher"] = C.model_summary(teacher)
    batches, render_s = pre_render(base, teacher)
    encode_batch(teacher, batches[0])  # warm-up
    variants = {f"build w={w}": replace(base, workers=w, out=str(tmp / f"w{w}.zarr")) for w in args.workers}
    seen: dict[str, list[dict]] = {name: [] for name in variants}
    calls = {"teacher forward only": lambda: [encode_batch(teacher, b) for b in batches]}
    calls |= {name: (lambda o=o, s=seen[name]: probe.run(o, s)) for name, o in variants.items()}
    times = C.interleaved(calls, args.repeats, args.device)
    fp16 = Path(next(iter(variants.values())).out)
    rewrite_as_fp32(fp16, tmp / "fp32.zarr")
    sizes = store_sizes({"fp16 (as built)": fp16, "fp32 (re-written)": tmp / "fp32.zarr"}, args.samples)
    report(args, times, seen, render_s, sizes, results)
    if args.profile is not None:
        results["profile"] = profile_build(replace(base, workers=args.profile, out=str(tmp / "profile.zarr")))
        print(f"\n-- cProfile of one build_cache, workers={args.profile} (main process only)")
        print(results["profile"])
    return fp16


def main() -> None:
    args = parse_args()
    results = C.start("stage one: build_cache vs teacher forward alone", args)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp = Path(tmp)
        measure(args, C.make_corpus(tmp / "corpus", args.samples, args.image_size), tmp, results)
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
