"""The GPU code paths in one run (one GPU, sized for under 8 minutes): measured and checked against their goals.

1. build: a corpus of --samples synthetic --image-size px JPEGs; `bench_build.measure` builds a --teacher store on
   --device with --build-workers decode workers (fp16 autocast on a GPU), interleaved with the bare teacher
   forward on the same batches pre-decoded on the device. Goal: the build's teacher pass >= 0.95 of it.
2. train: `bench_train.measure` on that store: --student at --batch-size in --precision, student-only, cached KD
   (the CLIP-KD losses) and live KD steps interleaved; the DataLoader alone (--train-workers processes), so a
   shortfall is told to be decode, targets or compute. Goals: cached <= 1.05 x student-only; live / cached
   within 10 % of 1 + teacher forward / cached step; the DataLoader alone keeps up with the cached step.
3. agreement: a store of --agree-samples built on --device equals one built on the CPU to fp16 rounding, and
   cached targets equal the live teacher's (min cosine per row >= 0.999 each).
4. retrieval: FAISS flat on the GPU vs the CPU at --faiss-captions captions, recall equal (skipped when faiss
   is not installed or has no GPU support).
5. paths: the trainer's GPU paths on the build's store, cached KD at --batch-size, interleaved: the plain step,
   --accum-freq 2 (two micro-batches of half the batch), --grad-checkpointing, --torchcompile, --precision amp and
   --local-loss (one rank: its own rows are all rows), each step's time and peak device memory; host reads per
   step counted (goal: 0); the first step's gradients of accumulation and checkpointing equal the plain step's,
   and the compiled loss the eager one. The multi-rank DDP step itself needs two GPUs: `bench/bench_ddp.py`.

Writes the results and a pass / fail per goal (JSON with --json, rewritten after each step), and exits 1 when
an agreement check fails or a step raised (the other steps still run): slow is a finding, different numbers are
a bug. `--device cpu --tiny` runs every step in seconds (the test).

    python bench/gpu_check.py --device cuda --json gpu_check.json
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

import _common as C  # noqa: N812 - also puts the repo on sys.path
import bench_build
import bench_train
from stage2_student.train import Trainer, TrainOptions
from common.cache import CacheStore
from stage1_teacher.build import BuildOptions, build_cache

MIN_COSINE = 0.999  # fp16 rounding of unit vectors keeps cosines above this (kd-cache verify's fp16 threshold)
LIVE_TOLERANCE = 0.10  # live / cached may differ this much (relative) from 1 + teacher / cached step
# --tiny: the test models on a 64-sample corpus, one round of everything
TINY = {"teacher": "kd-test-teacher", "student": "kd-test-student", "samples": 64, "image_size": 32,
        "batch_size": 16, "chunk_rows": 16, "build_workers": [1], "train_workers": 1, "repeats": 1, "warmup": 1,
        "batches": 2, "loader_steps": 2, "reader_rows": 2000, "reader_calls": 2, "agree_samples": 32,
        "faiss_captions": 1000, "faiss_dim": 16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="ViT-B-16")
    p.add_argument("--student", default="ViT-T-16")
    p.add_argument("--samples", type=int, default=6144,
                   help="corpus size (raised to what the train runs need); 24 blocks: 6 or 12 workers get as many")
    p.add_argument("--image-size", type=int, default=256, help="corpus image side (the models resize)")
    p.add_argument("--batch-size", type=int, default=256, help="build and training batch")
    p.add_argument("--chunk-rows", type=int, default=256, help="store chunk rows = build block: one per worker")
    p.add_argument("--build-workers", type=int, nargs="+", default=[6, 12], help="decode workers, one build each")
    p.add_argument("--train-workers", type=int, default=12, help="training DataLoader workers")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="training precision (the amp path is measured beside it)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the builds and of the steps")
    p.add_argument("--warmup", type=int, default=2, help="training rounds run first and not measured")
    p.add_argument("--batches", type=int, default=4, help="pre-loaded training batches")
    p.add_argument("--loader-steps", type=int, default=12, help="batches of each DataLoader run")
    p.add_argument("--reader-rows", type=int, default=100_000, help="rows of the cached-target reader's store")
    p.add_argument("--reader-calls", type=int, default=50)
    p.add_argument("--agree-samples", type=int, default=512, help="corpus of the device vs CPU store check")
    p.add_argument("--faiss-captions", type=int, default=100_000)
    p.add_argument("--faiss-dim", type=int, default=512)
    C.add_common_args(p)
    return C.parse_args(p, TINY)


def build_args(args) -> argparse.Namespace:
    return bench_build.parse_args([
        "--teacher", args.teacher, "--samples", str(args.samples), "--batch-size", str(args.batch_size),
        "--workers", *map(str, args.build_workers), "--image-size", str(args.image_size),
        "--chunk-rows", str(args.chunk_rows), "--repeats", str(args.repeats), "--device", args.device])


def train_args(args) -> argparse.Namespace:
    return bench_train.parse_args([
        "--student", args.student, "--teacher", args.teacher, "--batch-size", str(args.batch_size),
        "--batches", str(args.batches), "--image-size", str(args.image_size), "--repeats", str(args.repeats),
        "--warmup", str(args.warmup), "--reader-rows", str(args.reader_rows),
        "--reader-calls", str(args.reader_calls), "--workers", str(args.train_workers),
        "--loader-steps", str(args.loader_steps), "--precision", args.precision, "--device", args.device])


def store_agreement(a: Path, b: Path) -> dict[str, float]:
    """Min per-row cosine of two stores' embeddings, over the rows valid in both."""
    first, second = CacheStore(str(a)), CacheStore(str(b))
    valid = first.load("valid") & second.load("valid")
    rows = lambda store, name: torch.from_numpy(store.to_float(name, store.load(name)[valid]))  # noqa: E731
    return {name: float(torch.nn.functional.cosine_similarity(rows(first, name), rows(second, name), dim=-1).min())
            for name in ("image_emb", "text_emb")}


def device_vs_cpu_store(args, tmp: Path) -> dict[str, float]:
    """The same corpus built on --device and on the CPU (the build's own options otherwise; with --device cpu,
    two builds that must agree all the same)."""
    data = C.make_corpus(tmp / "agree-corpus", args.agree_samples, args.image_size)
    stores = {"device": tmp / "agree-device.zarr", "cpu": tmp / "agree-cpu.zarr"}
    for where, device in (("device", args.device), ("cpu", "cpu")):
        with C.quiet_stderr():
            build_cache(BuildOptions(teacher=args.teacher, data=str(data), out=str(stores[where]),
                                     batch_size=args.batch_size, chunk_rows=args.chunk_rows, device=device,
                                     workers=max(args.build_workers)))
    return store_agreement(stores["device"], stores["cpu"])


def faiss_flat(args) -> dict:
    """bench_faiss's exact search (FAISS flat on the CPU, on the GPU when faiss has one, torch brute force)."""
    try:
        import bench_faiss
    except (ImportError, OSError) as e:  # OSError: a faiss-gpu whose CUDA libraries are not there
        return {"skipped": f"faiss cannot be imported ({e})"}
    return bench_faiss.bench_exact([args.faiss_captions], args.faiss_dim, args.device)[0]


def goal(kind: str, what: str, value, target: str, passed: bool | None, note: str = "") -> dict:
    """One goal's row; kind 'speed' (a miss is a finding) or 'agreement' (a miss is a bug); passed None: skipped."""
    return {"kind": kind, "goal": what, "value": value, "target": target, "note": note,
            "status": "skipped" if passed is None else "pass" if passed else "FAIL"}


def build_goals(args, build: dict) -> list[dict]:
    forward_rate = args.samples / C.median(build["times_s"]["teacher forward only"])
    loop = {name: C.median([s["loop_samples_per_s"] for s in seen]) / forward_rate
            for name, seen in build["inside_builds"].items()}
    best = max(loop, key=loop.get)
    return [goal("speed", "build teacher pass / bare forward", loop[best], ">= 0.95", loop[best] >= 0.95,
                 f"{best}; end to end, model creation included: {build['ratios_vs_forward'][best]:.3f}")]


def train_goals(args, train: dict) -> list[dict]:
    times = train["times_s"]
    a, b, c = times["(a) student-only step"], times["(b) cached KD step"], times["(c) live KD step"]
    cached, live = C.paired_ratio(b, a), C.paired_ratio(c, b)
    predicted = C.median([1 + t / s for t, s in zip(times["teacher forward (live targets)"], b)])
    loader, step = (args.batch_size / C.median(t) for t in (train["loader_alone_s"], b))
    target_cos = min(train["target_agreement_min_cosine"].values())
    return [
        goal("speed", "cached KD step / student-only step", cached, "<= 1.05", cached <= 1.05),
        goal("speed", "live KD step / cached KD step", live,
             f"1 + teacher / cached step = {predicted:.3f} (+-{LIVE_TOLERANCE:.0%})",
             abs(live / predicted - 1) <= LIVE_TOLERANCE),
        goal("speed", "DataLoader alone / cached KD step, samples/s", loader / step, ">= 1", loader >= step,
             f"{args.train_workers} workers: {loader:.4g} vs {step:.4g} samples/s"),
        goal("agreement", "cached vs live targets, min cosine", target_cos, f">= {MIN_COSINE}",
             target_cos >= MIN_COSINE, f"one batch, on {args.device}"),
    ]


def agreement_goals(args, agreement: dict) -> list[dict]:
    store_cos = min(agreement.values())
    return [goal("agreement", f"store on {args.device} vs on cpu, min cosine", store_cos, f">= {MIN_COSINE}",
                 store_cos >= MIN_COSINE, "image and text embeddings, every row")]


def retrieval_goals(args, faiss: dict) -> list[dict]:
    on_gpu = "faiss flat gpu" in faiss.get("seconds", {})
    why_not = faiss.get("skipped", "no FAISS search on a GPU (--device cpu, or faiss without GPU)")
    return [goal("agreement", "FAISS flat recall, GPU == CPU", faiss["equal"] if on_gpu else None, "equal",
                 faiss["equal"] if on_gpu else None, f"{args.faiss_captions} captions" if on_gpu else why_not)]


PATHS = {"plain": {}, "accum-freq 2": {"accum_freq": 2}, "grad-checkpointing": {"grad_checkpointing": True},
         "torchcompile": {"torchcompile": True}, "amp": {"precision": "amp"}, "local-loss": {"local_loss": True}}
# the paths' agreement with the plain step: float summation order in fp32; bf16 autocast rounds every matmul
GRAD_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")


def trainer_paths(args, data: Path, store: Path, tmp: Path, out: dict) -> None:
    """Section 5: every PATHS variant's step (seconds, peak memory), host reads and first-step agreement."""
    base = dict(data=str(data), cache=str(store), student=args.student, batch_size=args.batch_size, steps=10**6,
                warmup=10, workers=0, device=args.device, precision=args.precision, losses=bench_train.KD_LOSSES)
    runs = {}
    with C.quiet_stderr():
        for name, kw in PATHS.items():
            if kw.get("precision") == "amp" and args.device != "cuda":
                continue  # fp16 autocast on a CPU runs, but says nothing of a GPU's
            size = {"batch_size": args.batch_size // kw["accum_freq"]} if "accum_freq" in kw else {}
            runs[name] = Trainer(TrainOptions(out=str(tmp / f"path-{len(runs)}"), **{**base, **kw, **size}))
    items = {name: [t.loader(0, 0).dataset[0, i] for i in range(min(2 * args.batches, len(t.order.micro_batches(0))))]
             for name, t in runs.items()}

    def step(name: str, first: int = 0) -> None:
        t = runs[name]
        a = t.opts.accum_freq
        t.train_step([t.micro_batch(b) for b in items[name][first * a:(first + 1) * a]], log_step=False)

    # before any step: the first batch's loss compiled vs eager, then the first step's gradients
    losses = {name: float(runs[name].compute_loss(items[name][0])[0]) for name in ("plain", "torchcompile")}
    grads = {}
    for name in ("plain", "accum-freq 2", "grad-checkpointing"):
        step(name)
        grads[name] = [p.grad.float().clone() for p in runs[name].model.parameters() if p.grad is not None]
    peaks = {}

    def measured(name: str):
        def run():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(name, current["i"])
            if args.device == "cuda":
                peaks.setdefault(name, []).append(torch.cuda.max_memory_allocated())
        return run

    current = {"i": 0}
    out["times_s"] = C.interleaved({name: measured(name) for name in runs}, args.repeats, args.device,
                                   warmup=args.warmup, before_round=lambda r: current.update(i=r % args.batches))
    out["peak_memory_bytes"] = {name: max(v) for name, v in peaks.items()}
    reads = []
    originals = {m: getattr(torch.Tensor, m) for m in READS}
    for m, original in originals.items():
        setattr(torch.Tensor, m, lambda *a, _m=m, _o=original, **k: (reads.append(_m), _o(*a, **k))[1])
    try:
        step("plain")
    finally:
        for m, original in originals.items():
            setattr(torch.Tensor, m, original)
    out["host_reads_per_step"] = len(reads)
    norm = lambda tensors: float(torch.stack([t.norm() for t in tensors]).norm())  # noqa: E731 - of all of them
    out["rel_grad_diff"] = {name: norm([a - b for a, b in zip(g, grads["plain"])]) / norm(grads["plain"])
                            for name, g in grads.items() if name != "plain"}
    out["compiled_vs_eager_loss_rel"] = abs(losses["torchcompile"] / losses["plain"] - 1)
    C.print_table(["path", "median step s", "vs plain", "peak MB"],
                  [[name, C.median(t), C.paired_ratio(t, out["times_s"]["plain"]),
                    out["peak_memory_bytes"].get(name, 0) / 2**20] for name, t in out["times_s"].items()],
                  f"trainer paths, cached KD, batch {args.batch_size}, on {args.device}")


def path_goals(args, paths: dict) -> list[dict]:
    rows = [goal("agreement", "host reads per cached-KD step (not logged)", paths["host_reads_per_step"], "0",
                 paths["host_reads_per_step"] == 0)]
    tolerance = GRAD_TOLERANCE[args.precision]
    for name, diff in paths["rel_grad_diff"].items():
        rows.append(goal("agreement", f"{name}: first-step gradients vs plain (relative norm of the difference)", diff,
                         f"<= {tolerance:g}", diff <= tolerance,
                         "accumulation: 2 x half the batch" if "accum" in name else ""))
    rows.append(goal("agreement", "torchcompile loss vs eager, relative", paths["compiled_vs_eager_loss_rel"],
                     f"<= {tolerance:g}", paths["compiled_vs_eager_loss_rel"] <= tolerance))
    times = paths["times_s"]
    for name in times:
        if name != "plain":
            ratio = C.paired_ratio(times[name], times["plain"])
            rows.append(goal("speed", f"{name} step / plain step", ratio, "measured", True,
                             f"peak {paths['peak_memory_bytes'].get(name, 0) / 2**20:.0f} MB vs "
                             f"{paths['peak_memory_bytes'].get('plain', 0) / 2**20:.0f} MB"))
    return rows


GOALS = {"build": build_goals, "train": train_goals, "agreement": agreement_goals, "retrieval": retrieval_goals,
         "paths": path_goals}


def main() -> None:
    args = parse_args()
    if args.loader_steps < 1:
        raise SystemExit("--loader-steps must be >= 1: the DataLoader goal needs a loader run")
    results = C.start(f"GPU code paths on {args.device}: build, training, agreement, retrieval", args)
    results["config"] = vars(args)
    # DataLoader workers hand batches over in shared memory: a small /dev/shm ends them with a bus error
    results["dev_shm_bytes"] = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else None
    print(f"/dev/shm: {results['dev_shm_bytes']} bytes")
    logging.getLogger("kd-cache").setLevel(logging.WARNING)
    section_s = results["section_s"] = {}
    goals = results["goals"] = []
    run_started = time.perf_counter()

    def section(name: str, measure) -> object:
        """Run one step, `measure(results[name])`, which fills that dict. An error is recorded as the step's goal
        and the next steps still run (one device try should tell as much as it can); the JSON is rewritten
        after each step, so a run cut short keeps what it measured."""
        started, results[name] = time.perf_counter(), {}
        try:
            value = measure(results[name])
            goals.extend(GOALS[name](args, results[name]))
        except Exception as e:  # noqa: BLE001 - reported as the step's result, with its traceback
            value = None
            results[name] = {"error": traceback.format_exc()}
            goals.append(goal("error", f"{name} step", None, "runs", False, f"{type(e).__name__}: {e}"[:200]))
            print(results[name]["error"])
        section_s[name] = time.perf_counter() - started
        print(f"\n[{name}: {section_s[name]:.1f} s]")
        C.write_json(args.json, results)
        return value

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        train = train_args(args)
        args.samples = max(args.samples, bench_train.corpus_samples(train))
        data = C.make_corpus(tmp / "corpus", args.samples, args.image_size)
        store = section("build", lambda out: bench_build.measure(build_args(args), data, tmp, out))
        if store is not None:
            section("train", lambda out: bench_train.measure(train, data, store, tmp, out))
        else:
            goals.append(goal("error", "train step", None, "runs", False, "not run: it trains on the build's store"))
        section("agreement", lambda out: out.update(device_vs_cpu_store(args, tmp)))
        section("retrieval", lambda out: out.update(faiss_flat(args)))
        if store is not None:
            section("paths", lambda out: trainer_paths(args, data, store, tmp, out))
    C.print_table(["goal", "value", "target", "status", "note"],
                  [[g["goal"], "" if g["value"] is None else g["value"], g["target"], g["status"], g["note"]]
                   for g in goals], f"goals ({time.perf_counter() - run_started:.0f} s in all)")
    failed = [g["goal"] for g in goals if g["kind"] in ("agreement", "error") and g["status"] == "FAIL"]
    if failed:
        raise SystemExit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
