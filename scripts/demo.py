"""The whole job on the embedded corpus, one command: corpus -> teacher -> cache -> baseline and distilled
students -> evaluation table and figure. About 15 minutes on 2 CPU cores at --scale 1.

    python scripts/demo.py [--out demo_out] [--scale 1.0] [--device cpu]

Every step is a real `kd-*` command, printed before it runs, and skipped when its output is already there
from the same command (re-running after an interruption continues where it stopped).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import cli, run_step  # noqa: E402

TEACHER, STUDENT = "kd-demo-teacher", "kd-demo-student"
KD_LOSSES = "task,fd,icl,crd"  # CLIP-KD's recipe with the paper's weights
BATCH = 128


def warmup(samples: int, epochs: int) -> int:
    """10% of a run's steps (kd-train caps --warmup there, with a warning): full batches only, as kd-train counts."""
    return max(1, epochs * (samples // BATCH) // 10)


def sizes(scale: float) -> dict:
    """Teacher on the whole train split, students on its first quarter (the paper's transfer setting)."""
    shard = 1000
    train_shards = max(4, round(16 * scale))
    return {
        "shard_size": shard, "train": train_shards * shard, "val": 1000, "zeroshot": max(640, round(640 * scale)),
        "student_shards": max(1, train_shards // 4), "teacher_epochs": 3, "student_epochs": 6,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--scale", type=float, default=1.0, help="corpus size multiplier (1 = 16k train samples)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    s = sizes(args.scale)
    out = args.out
    corpus, teacher_run, cache = out / "corpus", out / "teacher", out / "teacher_cache.zarr"
    student_data = str(corpus / "train" / f"{{00000..{s['student_shards'] - 1:05d}}}.tar")
    common_train = ["--batch-size", BATCH, "--lr", "1e-3", "--device", args.device, "--workers", args.workers,
                    "--log-every", 20]
    total = 0.0

    total += run_step("1/6 corpus", cli("kd-data") + [
        "synth", corpus, "--train", s["train"], "--val", s["val"], "--zeroshot", s["zeroshot"],
        "--shard-size", s["shard_size"], "--image-size", 64, "--seed", 0, "--overwrite"], corpus)
    total += run_step("2/6 teacher (plain CLIP, whole train split)", cli("kd-train") + [
        "--data", corpus / "train", "--student", TEACHER, "--losses", "task", "--out", teacher_run,
        "--epochs", s["teacher_epochs"], "--warmup", warmup(s["train"], s["teacher_epochs"]), *common_train],
        teacher_run, inputs=(corpus,))
    total += run_step("3/6 teacher cache over the students' split", cli("kd-cache") + [
        "build", "--teacher", f"local-dir:{teacher_run}", "--data", student_data,
        "--out", cache, "--batch-size", 256, "--grad-batch", 128, "--device", args.device,
        "--workers", args.workers], cache, inputs=(teacher_run,))
    runs = {"baseline": ("task", None), "distilled": (KD_LOSSES, cache)}
    for i, (name, (losses, store)) in enumerate(runs.items()):
        total += run_step(f"{4 + i}/6 student: {name} ({losses})", cli("kd-train") + [
            "--data", student_data, "--student", STUDENT, "--losses", losses, "--out", out / name,
            "--epochs", s["student_epochs"], "--warmup", warmup(s["student_shards"] * s["shard_size"], s["student_epochs"]),
            *common_train, *(["--cache", store] if store else [])],
            out / name, inputs=(cache,) if store else (corpus,))
    total += run_step("6/6 evaluation", cli("kd-eval") + [
        "compare", "--data", corpus / "val", "--zeroshot-data", corpus / "zeroshot",
        "--classnames", corpus / "zeroshot" / "classnames.txt",
        "--entry", f"teacher=local-dir:{teacher_run}",  # every run folder is an open_clip hub folder
        "--entry", f"baseline=local-dir:{out / 'baseline'}",
        "--entry", f"distilled=local-dir:{out / 'distilled'}",
        "--teacher-entry", "teacher", "--baseline-entry", "baseline",
        "--markdown", out / "results.md", "--figure", out / "results.png",
        "--output", out / "results.json", "--device", args.device],
        out / "results.md", inputs=(teacher_run, out / "baseline", out / "distilled"))
    print(f"\n{(out / 'results.md').read_text()}\nfigure: {out / 'results.png'}\n"
          f"steps run now: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
