"""Stage two per student family: a cached-KD step against a student-only step, in one run.

For each student (one per tower family: open_clip ViT, ModifiedResNet, timm ConvNeXt, timm ViT, FastViT /
MobileCLIP, a sigmoid-loss SigLIP-style model), on the same pre-loaded batches, interleaved round by round (first
--warmup rounds dropped, medians over --repeats): `Trainer.train_step` with --losses task (no teacher) and with
--losses task,fd,icl,crd from the cache of one ViT teacher (--teacher-targets cache). Goal: cached / student-only
<= 1.05 for every family (the cache makes distillation cost what the student costs).

    python bench/bench_families.py --batch-size 128 --repeats 6 --threads 1
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import _common as C  # noqa: N812 - also puts the repo on sys.path
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.train import Trainer, TrainOptions

KD_LOSSES = "task,fd,icl,crd"
STUDENTS = ["kd-demo-student", "kd-demo-rn-student", "kd-test-convnext", "kd-test-timm-vit", "kd-test-mobileclip",
            "kd-test-sigmoid"]
GOAL = 1.05
# --tiny: 2 students, batch 8, 1 round: a check that it runs
TINY = {"students": STUDENTS[:2], "batch_size": 8, "batches": 1, "repeats": 1, "warmup": 0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", nargs="+", default=STUDENTS)
    p.add_argument("--teacher", default="kd-demo-teacher")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=3, help="distinct pre-loaded batches")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6, help="measured interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not measured")
    C.add_common_args(p)
    return C.parse_args(p, TINY)


def family_times(args, student: str, data: Path, cache: Path, tmp: Path) -> dict:
    base = dict(data=str(data), student=student, batch_size=args.batch_size, steps=10**6, warmup=10, workers=0,
                device=args.device)
    with C.quiet_stderr():
        runs = {"student-only": Trainer(TrainOptions(out=str(tmp / f"{student}-a"), losses="task", **base)),
                "cached KD": Trainer(TrainOptions(out=str(tmp / f"{student}-b"), cache=str(cache), losses=KD_LOSSES,
                                                  teacher_targets="cache", **base))}
    batches = [runs["cached KD"].loader(0, 0).dataset[0, i] for i in range(args.batches)]
    current = {"i": 0}
    times = C.interleaved({name: (lambda t=trainer: t.train_step([t.micro_batch(batches[current["i"]])]))
                           for name, trainer in runs.items()},
                          args.repeats, args.device, warmup=args.warmup,
                          before_round=lambda r: current.update(i=r % len(batches)))
    a, b = times["student-only"], times["cached KD"]
    info = runs["cached KD"].student_clip.info
    return {"student": student, "image tower": info.image.kind, "sigmoid": info.sigmoid,
            "summary": C.model_summary(runs["cached KD"].student_clip), "times_s": times,
            "student_only_s": C.median(a), "cached_kd_s": C.median(b), "ratio": C.median(b) / C.median(a),
            "paired_ratio": C.paired_ratio(b, a), "goal": GOAL}


def main() -> None:
    args = parse_args()
    results = C.start("stage two per student family: cached KD vs student-only step", args)
    logging.getLogger("kd-cache").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        tmp = Path(tmp)
        data = C.make_corpus(tmp / "corpus", args.batch_size * args.batches, args.image_size)
        with C.quiet_stderr():
            build_cache(BuildOptions(teacher=args.teacher, data=str(data), out=str(tmp / "cache.zarr"),
                                     batch_size=args.batch_size, grad_batch=args.batch_size, device=args.device,
                                     workers=0))
        families = [family_times(args, s, data, tmp / "cache.zarr", tmp) for s in args.students]
    C.print_table(["student", "image tower", "student-only s", "cached KD s", "ratio", "paired", "goal"],
                  [[f["student"], f["image tower"] + (" (sigmoid)" if f["sigmoid"] else ""), f["student_only_s"],
                    f["cached_kd_s"], f["ratio"], f["paired_ratio"], f"<= {GOAL}"] for f in families],
                  f"batch {args.batch_size}, teacher {args.teacher}, losses {KD_LOSSES}, {args.repeats} rounds")
    results.update({"config": vars(args), "families": families})
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
