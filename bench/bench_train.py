"""Stage two: cost of distillation per training step, from the cache and from the live teacher.

On the same pre-loaded batches and the same student, interleaved round by round (first --warmup rounds
dropped, medians over --repeats): (a) student-only `Trainer.train_step` (--losses task, no teacher), (b) cached
KD (--losses task,fd,icl,crd, --teacher-targets cache), (c) live-teacher KD (same losses, --teacher-targets
live), the live teacher's forward alone (`TargetProvider` in live mode), the cached-target reader
(`TargetProvider` in cache mode on random rows of a store of --reader-rows rows), and the loading of one batch
in this process (`TrainBatches[i]`: tar reads, decode, render, tokenize). Goals: cached / student-only <= 1.05;
reader rows/s >= 20x the cached step's samples/s. live / cached is compared with 1 + teacher / cached step.
Then, not interleaved, the real DataLoader (--workers processes) alone, and cached KD fed by it, --loader-steps
steps each; and the cached targets against the live teacher's on one batch (min cosine per row).

    python bench/bench_train.py --batch-size 256 --repeats 8
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _common as C  # noqa: N812 - also puts the repo on sys.path
from common.cache import COMPLETE_KEYS, CacheStore, content_hash, create_store
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.targets import TargetProvider
from stage2_student.train import Trainer, TrainOptions

KD_LOSSES = "task,fd,icl,crd"
# --tiny: the test models, 2 batches of 16, one round after one warm-up, a loader run of 2 steps
TINY = {"student": "kd-test-student", "teacher": "kd-test-teacher", "batch_size": 16, "batches": 2, "image_size": 32,
        "repeats": 1, "warmup": 1, "reader_rows": 2000, "reader_calls": 2, "workers": 1, "loader_steps": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="kd-demo-student")
    p.add_argument("--teacher", default="kd-demo-teacher")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="distinct pre-loaded batches (corpus = batches x size)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8, help="measured interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="rounds run first and not measured")
    p.add_argument("--reader-rows", type=int, default=200_000, help="rows of the store the reader serves from")
    p.add_argument("--reader-calls", type=int, default=50, help="reader calls per round")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader run")
    p.add_argument("--loader-steps", type=int, default=6, help="steps of the loader runs (0: skip them)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "amp"), default="auto",
                   help="the trainers' --precision (auto: bf16 on a GPU that has it)")
    C.add_common_args(p)
    return C.parse_args(p, TINY, argv)


def build_teacher_cache(args, data: Path, out: Path) -> Path:
    """The teacher's cache for the corpus (random-init teacher: timings do not depend on the weights)."""
    with C.quiet_stderr():
        build_cache(BuildOptions(teacher=args.teacher, data=str(data), out=str(out), batch_size=args.batch_size,
                                 device=args.device, workers=0))
    return out


def trainers(args, data: Path, cache: Path, tmp: Path) -> dict[str, Trainer]:
    base = dict(data=str(data), student=args.student, batch_size=args.batch_size, steps=10**6, warmup=10,
                workers=args.workers, device=args.device, precision=args.precision)
    with C.quiet_stderr():
        return {
            "student-only": Trainer(TrainOptions(out=str(tmp / "a"), losses="task", **base)),
            "cached KD": Trainer(TrainOptions(out=str(tmp / "b"), cache=str(cache), losses=KD_LOSSES,
                                              teacher_targets="cache", **base)),
            "live KD": Trainer(TrainOptions(out=str(tmp / "c"), cache=str(cache), losses=KD_LOSSES,
                                            teacher_targets="live", **base)),
        }


def big_store(real: CacheStore, rows: int, path: Path) -> CacheStore:
    """A complete store shaped like `real` with `rows` rows of random unit fp16 embeddings."""
    index = C.synthetic_index(rows)
    corpus = {"num_samples": rows, "shards": index.shard_identities()}  # the layout follows the rows
    attrs = {k: v for k, v in real.attrs.items() if k != "complete_hash"}  # sealed below, as a build seals
    group = create_store(str(path), attrs | {"corpus": corpus}, index)
    rng = np.random.default_rng(0)
    for name in ("image_emb", "text_emb"):
        x = rng.standard_normal((rows, real.embed_dim), dtype=np.float32)
        group[name][...] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(group[name].dtype)
    group["valid"][...] = True
    group["sample_crc32c"][...] = 0  # no sample of this store is ever read
    group["blocks_done"][...] = True
    group.attrs["complete"] = True
    group.attrs["complete_hash"] = content_hash(dict(group.attrs), COMPLETE_KEYS)
    return CacheStore(str(path))


def reader_requests(rows: int, batch: int, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`count` cached-target lookups (`TargetProvider.lookup`: what a loader worker does per micro-batch) of
    `batch` random rows each, clean view and each sample's own caption (-1), made once, outside timing."""
    rng = np.random.default_rng(0)
    return [(rng.integers(0, rows, batch), np.zeros(batch, dtype=np.int64), np.full(batch, -1, dtype=np.int64))
            for _ in range(count)]


def step(trainer: Trainer, batch: dict) -> None:
    """One optimizer step from a loader item: its way to the device, the targets, forward, backward, AdamW."""
    trainer.train_step([trainer.micro_batch(batch)])


def interleaved_rounds(args, runs: dict[str, Trainer], batches: dict[str, list[dict]],
                       reader: TargetProvider) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved; round r feeds batch r % --batches to every variant (each
    trainer its own loader's item: a cached-KD item carries its looked-up targets)."""
    dataset = runs["cached KD"].loader(0, 0).dataset
    requests = reader_requests(args.reader_rows, args.batch_size, args.reader_calls)
    current = {"i": 0}
    batch = lambda name: batches[name][current["i"]]  # noqa: E731
    variants = {
        "(a) student-only step": lambda: step(runs["student-only"], batch("live KD")),
        "(b) cached KD step": lambda: step(runs["cached KD"], batch("cached KD")),
        "(c) live KD step": lambda: step(runs["live KD"], batch("live KD")),
        "teacher forward (live targets)": lambda: runs["live KD"].teacher_targets(batch("live KD")),
        f"target reader x{args.reader_calls}": lambda: [reader.lookup(*q, False) for q in requests],
        "load one batch (1 process)": lambda: dataset[0, current["i"]],
    }
    return C.interleaved(variants, args.repeats, args.device, warmup=args.warmup,
                         before_round=lambda r: current.update(i=r % args.batches))


def loader_runs(trainer: Trainer, steps: int, device: str) -> dict[str, list[float]]:
    """Wall seconds per batch of the trainer's own DataLoader alone, then per cached-KD step fed by it (data
    wait included); the first batch of each (worker start-up) not counted."""
    def per_batch(consume) -> list[float]:
        seconds = []
        loader = iter(trainer.loader(0, 0))
        consume(next(loader))
        for _ in range(steps):
            start = time.perf_counter()
            consume(next(loader))
            C.synchronize(device)
            seconds.append(time.perf_counter() - start)
        del loader  # shuts its workers down
        return seconds
    return {"alone": per_batch(lambda batch: None), "fed_step": per_batch(lambda batch: step(trainer, batch))}


def target_agreement(runs: dict[str, Trainer], batches: dict[str, list[dict]]) -> dict[str, float]:
    """Min per-row cosine of the cached targets against the live teacher's, on one batch."""
    cached = runs["cached KD"].teacher_targets(batches["cached KD"][0])
    live = runs["live KD"].teacher_targets(batches["live KD"][0])
    return {name: float(torch.nn.functional.cosine_similarity(getattr(cached, name), getattr(live, name),
                                                              dim=-1).min()) for name in ("image_emb", "text_emb")}


def ratio_rows(args, times: dict) -> list[list]:
    """[quantity, ratio of medians, median of per-round ratios, goal] for the headline ratios."""
    bs, calls = args.batch_size, args.reader_calls
    a, b, c = times["(a) student-only step"], times["(b) cached KD step"], times["(c) live KD step"]
    teacher, load = times["teacher forward (live targets)"], times["load one batch (1 process)"]
    reader = [t / calls for t in times[f"target reader x{calls}"]]
    m = C.median
    predicted = [1 + t / s for t, s in zip(teacher, b)]
    return [
        ["cached KD step / student-only step", m(b) / m(a), C.paired_ratio(b, a), "<= 1.05"],
        ["live KD step / cached KD step", m(c) / m(b), C.paired_ratio(c, b), ""],
        ["  predicted: 1 + teacher forward / cached step", 1 + m(teacher) / m(b), m(predicted), ""],
        ["teacher forward / student-only step", m(teacher) / m(a), C.paired_ratio(teacher, a), ""],
        ["reader rows/s / cached-KD samples/s", m(b) / m(reader), C.paired_ratio(b, reader), ">= 20"],
        ["  reader rows/s", bs / m(reader), "", ""],
        ["  cached-KD consumption samples/s", bs / m(b), "", ""],
        ["load one batch / cached step (processes to keep up)", m(load) / m(b), C.paired_ratio(load, b), ""],
    ]


def report(args, times: dict, memory: dict, loader_s: dict[str, list[float]], agreement: dict,
           results: dict) -> None:
    bs = args.batch_size
    med = {name: C.median(raw) for name, raw in times.items()}
    print(f"\nstudent {results['student']}; teacher {results['teacher']}")
    print(f"batch_size={bs} losses(KD)={KD_LOSSES} rounds={args.repeats} (+{args.warmup} warm-up) "
          f"reader store rows={args.reader_rows}")
    C.print_table(["variant", "median_s", "samples/s", "raw_s"],
                  [[name, med[name], bs / med[name] if "reader" not in name else "",
                    " ".join(f"{t:.3f}" for t in raw)] for name, raw in times.items()],
                  "interleaved, seconds per call")
    ratios = ratio_rows(args, times)
    C.print_table(["quantity", "of_medians", "paired", "goal"], ratios,
                  "ratios (paired = median over rounds of the per-round ratio)")
    print(f"\ncached targets in memory (provider.memory_bytes): {memory['bytes_per_sample']:.0f} bytes/sample; "
          f"reader store of {args.reader_rows} rows: {memory['reader_mb']:.1f} MB")
    if args.loader_steps:
        alone, fed = C.median(loader_s["alone"]), C.median(loader_s["fed_step"])
        print(f"DataLoader alone (workers={args.workers}, not interleaved): {bs / alone:.1f} samples/s; cached KD "
              f"fed by it: median step {fed:.3f} s = {fed / med['(b) cached KD step']:.3f} x the pre-loaded cached "
              f"step median; raw {' '.join(f'{t:.3f}' for t in loader_s['fed_step'])}")
    print("cached vs live targets, one batch, min cosine per row: "
          + ", ".join(f"{name} {cos:.6f}" for name, cos in agreement.items()))
    results.update({"config": vars(args), "times_s": times, "medians_s": med, "memory": memory,
                    "ratios": [dict(zip(["quantity", "of_medians", "paired", "goal"], r)) for r in ratios],
                    "loader_alone_s": loader_s.get("alone", []), "loader_step_s": loader_s.get("fed_step", []),
                    "target_agreement_min_cosine": agreement})


def corpus_samples(args) -> int:
    """Samples the measurements need: --batches pre-loaded batches, and a loader run's batches."""
    return args.batch_size * max(args.batches, args.loader_steps + 1)


def measure(args, data: Path, cache: Path, tmp: Path, results: dict) -> None:
    """Everything measured on a corpus and its teacher's store (of at least `corpus_samples(args)` samples):
    prints the tables and fills `results`."""
    runs = trainers(args, data, cache, tmp)
    results["student"] = C.model_summary(runs["cached KD"].student_clip)
    results["teacher"] = C.model_summary(runs["live KD"].teachers["main"])
    batches = {name: [runs[name].loader(0, 0).dataset[0, i] for i in range(args.batches)]
               for name in ("cached KD", "live KD")}
    store = big_store(runs["cached KD"].cache, args.reader_rows, tmp / "reader.zarr")
    kd = runs["cached KD"].loss_set
    provider = TargetProvider("cache", kd.teacher_needs, kd.teacher_optional, store, None, grad_batches=False)
    memory = {"bytes_per_sample": runs["cached KD"].targets["main"].memory_bytes / runs["cached KD"].cache.num_rows,
              "reader_mb": provider.memory_bytes / 2**20}
    times = interleaved_rounds(args, runs, batches, provider)
    loader_s = loader_runs(runs["cached KD"], args.loader_steps, args.device) if args.loader_steps else {}
    report(args, times, memory, loader_s, target_agreement(runs, batches), results)


def main() -> None:
    args = parse_args()
    results = C.start("stage two: step cost of student-only, cached KD and live KD", args)
    logging.getLogger("kd-cache").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data = C.make_corpus(tmp / "corpus", corpus_samples(args), args.image_size)
        measure(args, data, build_teacher_cache(args, data, tmp / "cache.zarr"), tmp, results)
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
