"""Reinforced stores, measured on the demo's corpus (run scripts/demo.py first): a second teacher and a CoCa
captioner trained here, one store holding both teachers and synthetic captions, then students distilled from each
teacher alone, from the ensemble, and with synthetic captions, for several seeds.

    python scripts/reinforced.py [--demo-out demo_out] [--out reinforced_out] [--seeds 0 1 2]
        [--teacher-b CKPT] [--captioner CKPT]   # reuse a trained second teacher / captioner

Writes `<out>/reinforced.md` / `.json` (mean ± std over seeds, commands) and `<out>/store_costs.json` (bytes per
sample and build seconds per extra teacher and for the captions).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import attach_metrics, evaluate, student_data, train_rows, write_report  # noqa: E402
from demo import KD_LOSSES, TEACHER, sizes  # noqa: E402
from pipeline import cli, run_step, step_seconds  # noqa: E402

TEACHER_B, CAPTIONER = "kd-demo-teacher2", "kd-demo-coca"
CAPTIONS_PER_IMAGE = 2  # DataCompDR stores 5; 2 of at most 24 tokens fit this CPU's time (BENCHMARKS.md)
CAPTION_TOKENS = 24
SYNTHETIC_SHARE = 0.5  # probability that a sample shows a synthetic caption
TEACHER_ROWS = [
    ("baseline (no teacher)", "task", ()),
    ("teacher main alone", KD_LOSSES, ("--teachers", "main")),
    ("teacher b alone", KD_LOSSES, ("--teachers", "b")),
    ("ensemble main+b", KD_LOSSES, ("--teachers", "main,b")),
]
CAPTION_ROWS = [  # trained once the captions are in the store
    ("main + synthetic captions", KD_LOSSES, ("--teachers", "main", "--synthetic-captions", SYNTHETIC_SHARE)),
    ("ensemble + synthetic captions", KD_LOSSES, ("--teachers", "main,b", "--synthetic-captions", SYNTHETIC_SHARE)),
]
COMMON_TRAIN = ["--batch-size", 128, "--lr", "1e-3", "--warmup", 100, "--workers", 1, "--log-every", 20]


def group_bytes(group: zarr.Group, names) -> int:
    return sum(group[n].nbytes for n in names if n in group)


def store_costs(store: Path, seconds: dict[str, float]) -> dict:
    """Stored bytes per sample of each part, from the arrays' shapes and dtypes (uncompressed chunks)."""
    root = zarr.open_group(str(store), mode="r")
    n = root["valid"].shape[0]
    per_teacher = ("image_emb", "text_emb", "image_grad", "text_grad")
    return {
        "rows": n,
        "main teacher (root arrays)": group_bytes(root, per_teacher) / n,
        "teacher b (teachers/b)": group_bytes(root["teachers/b"], per_teacher) / n,
        "captions text (captions/text, utf-8 + offsets, on disk)":
            sum(p.stat().st_size for p in (store / "captions" / "text").rglob("*") if p.is_file()) / n,
        "caption embeddings, per teacher and caption": {
            "main": root["caption_text_emb"].nbytes / n / CAPTIONS_PER_IMAGE,
            "b": root["teachers/b/caption_text_emb"].nbytes / n / CAPTIONS_PER_IMAGE},
        "seconds": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, default=Path("demo_out"))
    parser.add_argument("--out", type=Path, default=Path("reinforced_out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-b", type=Path, default=None, help="a trained kd-demo-teacher2 checkpoint")
    parser.add_argument("--captioner", type=Path, default=None, help="a trained kd-demo-coca checkpoint")
    parser.add_argument("--rows", nargs="*", default=None, help="only these row names")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    s, out = sizes(1.0), args.out
    corpus, teacher_main = args.demo_out / "corpus", args.demo_out / "teacher" / "open_clip_model.safetensors"
    if not teacher_main.exists():
        raise SystemExit(f"no demo teacher at {teacher_main}: run `python scripts/demo.py --out {args.demo_out}`")
    device = ["--device", args.device]
    teacher_b = args.teacher_b
    if teacher_b is None:  # another architecture (D 96 instead of 128) and data order, the demo teacher's recipe
        run_step("teacher b", cli("kd-train") + [
            "--data", corpus / "train", "--student", TEACHER_B, "--losses", "task", "--out", out / "teacher_b",
            "--epochs", s["teacher_epochs"], "--seed", 1, *COMMON_TRAIN, *device], out / "teacher_b")
        teacher_b = out / "teacher_b" / "open_clip_model.safetensors"
    captioner = args.captioner
    data = student_data(corpus, s)
    store = out / "reinforced.zarr"
    run_step("store: teacher main", cli("kd-cache") + [
        "build", "--teacher", TEACHER, "--pretrained", teacher_main, "--data", data, "--out", store,
        "--batch-size", 256, "--grad-batch", 128, "--workers", 1, *device], store)
    run_step("store: add teacher b", cli("kd-cache") + [
        "add-teacher", store, "--name", "b", "--teacher", TEACHER_B, "--pretrained", teacher_b, "--data", data,
        "--workers", 1, *device], out / "teacher_b_added", inputs=(store,))
    results, runs = train_rows(TEACHER_ROWS, args, data, s["student_epochs"], store)
    if args.rows and not any(name in args.rows for name, _, _ in CAPTION_ROWS):
        return  # only teacher rows asked for: no captioner, no captions
    if captioner is None:  # CoCa's contrastive + captioning losses, trained with kd-train's `caption` loss
        run_step("captioner", cli("kd-train") + [
            "--data", corpus / "train", "--student", CAPTIONER, "--losses", "task,caption",
            "--out", out / "captioner", "--steps", 450, "--batch-size", 64, "--lr", "1e-3", "--warmup", 30,
            "--workers", 1, "--log-every", 20, *device], out / "captioner")
        captioner = out / "captioner" / "open_clip_model.safetensors"
    run_step("store: synthetic captions", cli("kd-cache") + [
        "captions", store, "--data", data, "--captioner", CAPTIONER, "--pretrained", captioner,
        "--per-image", CAPTIONS_PER_IMAGE, "--seq-len", CAPTION_TOKENS, "--batch-size", 128, *device], out / "captions_added", inputs=(out / "teacher_b_added",))
    costs = store_costs(store, {  # as last run (a step skipped now keeps its time)
        "build, teacher main": step_seconds(store), "add-teacher b": step_seconds(out / "teacher_b_added"),
        "captions (generate + embed by 2 teachers)": step_seconds(out / "captions_added")})
    (out / "store_costs.json").write_text(json.dumps(costs, indent=2))
    more, more_runs = train_rows(CAPTION_ROWS, args, data, s["student_epochs"], store)
    results, runs = results + more, runs | more_runs
    metrics = evaluate(runs, teacher_main, corpus, out, args.device,
                       other_models=(f"teacher_b={TEACHER_B}:{teacher_b}",))
    attach_metrics(results, metrics)
    write_report(out, results, metrics["teacher"], len(args.seeds), s["student_epochs"], name="reinforced",
                 teachers={"teacher main": metrics["teacher"], "teacher b": metrics["teacher_b"]})
    print(json.dumps(costs, indent=2))


if __name__ == "__main__":
    main()
