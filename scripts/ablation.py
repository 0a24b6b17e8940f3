"""The CLIP-KD ablation, reproduced small, on the demo's corpus, teacher and cache (run scripts/demo.py first).

    python scripts/ablation.py [--demo-out demo_out] [--out ablation_out] [--seeds 0 1 2] [--epochs 6]

Every row is task + the listed KD losses (each at its default weight), trained on the students' split for each
seed, then evaluated on val (retrieval) and zeroshot (acc1). Writes `<out>/ablation.md` (mean ± std over seeds,
wall time per run, and the command of each row) and `<out>/ablation.json`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import STUDENT, TEACHER, sizes  # noqa: E402
from pipeline import cli, run_step, step_seconds  # noqa: E402

# (row name, --losses, other kd-train options)
ROWS = [
    ("baseline", "task", ()),
    *[(f"+{loss}", f"task,{loss}", ()) for loss in ("crd", "fd", "mfd", "gd", "icl", "afd", "tokenfd", "cka", "dlip")],
    ("+fd+icl", "task,fd,icl", ()),
    ("+fd+icl+crd (CLIP-KD)", "task,fd,icl,crd", ()),
    ("+fd+icl+crd+gd", "task,fd,icl,crd,gd", ()),
    ("+fd+icl+crd+afd", "task,fd,icl,crd,afd", ()),
    ("+fd+icl+crd, live teacher", "task,fd,icl,crd", ("--teacher-targets", "live")),
    # GD's default weight (3e4) is calibrated for B = 256, D = 512; it scales as (B/256)^2 (D/512) (README),
    # which is 1875 for the demo's B = 128, D = 128
    ("+gd, weight scaled to B, D", "task,gd:1875", ()),
    ("+fd+icl+crd+gd, weight scaled to B, D", "task,fd,icl,crd,gd:1875", ()),
]
METRICS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "acc1")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def evaluate(runs: dict[str, Path], teacher_ckpt: Path, corpus: Path, out: Path, device: str,
             other_models: tuple[str, ...] = (), student: str = STUDENT) -> dict:
    """One `kd-eval compare` over the teacher, `other_models` (NAME=CONFIG:CKPT) and every run (each model
    encoded once): retrieval on val, zero-shot acc1, and each student's alignment (linear CKA) to the teacher."""
    entries = [f"teacher={TEACHER}:{teacher_ckpt}", *other_models] + [f"{name}=local-dir:{run}"
                                                                       for name, run in runs.items()]
    report = out / "compare.json"
    run_step("evaluation of all runs", cli("kd-eval") + [
        "compare", "--data", corpus / "val", "--zeroshot-data", corpus / "zeroshot",
        "--classnames", corpus / "zeroshot" / "classnames.txt", "--teacher-entry", "teacher", "--device", device,
        "--markdown", out / "compare.md", "--output", report,
        *[a for e in entries for a in ("--entry", e)]], report, inputs=tuple(runs.values()))
    comparison = json.loads(report.read_text())
    metrics: dict[str, dict] = {}
    for result in comparison["results"]:
        metrics.setdefault(result["model"], {}).update(result["metrics"])
    for name, alignment in comparison["alignment"].items():
        metrics[name].update({k: v for k, v in alignment.items() if v is not None})
    return metrics


def summarise(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, default=Path("demo_out"))
    parser.add_argument("--out", type=Path, default=Path("ablation_out"))
    parser.add_argument("--scale", type=float, default=1.0, help="the --scale the demo ran with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these row names")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default=STUDENT, help="the student model (any family, e.g. kd-demo-rn-student)")
    args = parser.parse_args(argv)
    s = sizes(args.scale)
    corpus, cache = args.demo_out / "corpus", args.demo_out / "teacher_cache.zarr"
    if not (cache / "zarr.json").exists():
        raise SystemExit(f"no teacher cache at {cache}: run `python scripts/demo.py --out {args.demo_out}` first")
    epochs = args.epochs or s["student_epochs"]
    results, runs = train_rows(ROWS, args, student_data(corpus, s), epochs, cache, args.student)
    metrics = evaluate(runs, args.demo_out / "teacher" / "open_clip_model.safetensors", corpus, args.out, args.device,
                       student=args.student)
    attach_metrics(results, metrics)
    write_report(args.out, results, metrics["teacher"], len(args.seeds), epochs, student=args.student)


def student_data(corpus: Path, s: dict) -> str:
    return str(corpus / "train" / f"{{00000..{s['student_shards'] - 1:05d}}}.tar")


def train_rows(rows, args, data: str, epochs: int, cache: Path, student: str = STUDENT
               ) -> tuple[list[dict], dict[str, Path]]:
    """Every (name, losses, options) row for every seed (`args.seeds`, `args.rows`, `args.out`, `args.device`):
    the students' split, the demo's student and recipe; the cache is given whenever a row has a KD loss."""
    results, runs = [], {}
    for name, losses, options in rows:
        if args.rows and name not in args.rows:
            continue
        per_seed, first_command = [], None
        for seed in args.seeds:
            run = args.out / f"{slug(name)}_seed{seed}"
            command = cli("kd-train") + [
                "--data", data, "--student", student, "--losses", losses, "--out", run,
                "--epochs", epochs, "--batch-size", 128, "--lr", "1e-3", "--warmup", 100, "--seed", seed,
                "--workers", 1, "--log-every", 20, "--device", args.device, *options,
                *(["--cache", cache] if losses != "task" else [])]
            first_command = first_command or command
            run_step(f"{name} seed {seed}", command, run, inputs=(cache,))
            per_seed.append({"seed": seed, "seconds": step_seconds(run), "run": run.name})
            runs[run.name] = run
        results.append({"row": name, "losses": losses, "options": list(options), "runs": per_seed,
                        "command": shlex.join(str(c) for c in first_command).replace(sys.executable, "python")})
    return results, runs


def attach_metrics(results: list[dict], metrics: dict) -> None:
    for row in results:
        for run in row["runs"]:
            run.update(metrics[run["run"]])


def write_report(out: Path, results: list[dict], teacher: dict, n_seeds: int, epochs: int, name: str = "ablation",
                 teachers: dict[str, dict] | None = None, student: str = STUDENT) -> list[str]:
    """`<out>/<name>.md` and `.json`: a row per configuration (mean ± std over seeds), a row per teacher."""
    out.mkdir(parents=True, exist_ok=True)
    teachers = teachers or {"teacher": teacher}
    (out / f"{name}.json").write_text(json.dumps({"teachers": teachers, "rows": results}, indent=2))
    head = ["row", *METRICS, "image CKA", "text CKA", "s / run"]
    lines = [f"Student {student}, teacher {TEACHER}; {epochs} epochs; mean ± std over {n_seeds} seeds (percent; "
             f"CKA = linear CKA of the student's val embeddings with the teacher's).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {t} | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRICS) + " | – | – | – |"
              for t, m in teachers.items()]
    for r in results:
        cells = [summarise([run[m] for run in r["runs"]]) for m in (*METRICS, "image_cka", "text_cka")]
        secs = statistics.mean(run["seconds"] for run in r["runs"])
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {secs:.0f} |")
    lines += ["", "Commands (first seed; the others change `--seed` and `--out`):", ""]
    lines += [f"- {r['row']}: `{r['command']}`" for r in results]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
