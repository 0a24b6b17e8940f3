"""Evaluation during training (--val-data, --zeroshot-data), checkpoint history (--keep, --keep-best) and
--resume auto: real runs, real FAISS, TensorBoard's own reader, kd-eval on the saved weights."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from common.models import create_clip, weights_fingerprint
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import REPO

STUDENT = "kd-test-student"
STEPS, SAVE_EVERY = 12, 4  # saves at 4, 8, 12


def options(synth_corpus: Path, out: Path, **extra) -> TrainOptions:
    return TrainOptions(**{**dict(data=str(synth_corpus / "train"), out=str(out), student=STUDENT, losses="task",
                                  batch_size=32, steps=STEPS, warmup=2, workers=0, log_every=1,
                                  save_every=SAVE_EVERY), **extra})


def cli_args(synth_corpus: Path, out: Path, *extra) -> list[str]:
    return ["--data", str(synth_corpus / "train"), "--out", str(out), "--student", STUDENT, "--losses", "task",
            "--batch-size", "32", "--steps", str(STEPS), "--warmup", "2", "--workers", "0", "--log-every", "1",
            "--save-every", str(SAVE_EVERY), *map(str, extra)]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kd_eval(*args) -> dict:
    """`kd-eval ARGS` in this process; its result JSON."""
    from evaluation.cli import main
    out = Path(args[args.index("--output") + 1])
    result = CliRunner().invoke(main, [*map(str, args), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plain_run(synth_corpus, tmp_path_factory) -> Path:
    """No validation; --keep 2."""
    out = tmp_path_factory.mktemp("history") / "plain"
    Trainer(options(synth_corpus, out, keep=2)).run()
    return out


@pytest.fixture(scope="module")
def validated_run(synth_corpus, tmp_path_factory) -> tuple[Path, Trainer]:
    """The same run, evaluated every 2 steps and at every save, reported to TensorBoard; --keep 1 --keep-best."""
    out = tmp_path_factory.mktemp("history") / "validated"
    trainer = Trainer(options(synth_corpus, out, val_data=str(synth_corpus / "val"), val_every=2,
                              zeroshot_data=str(synth_corpus / "zeroshot"), keep=1,
                              keep_best="val/image_to_text_R@5", report_to="tensorboard"))
    trainer.run()
    return out, trainer


def test_validation_changes_nothing_of_the_training(plain_run, validated_run):
    run, trainer = validated_run
    assert load_file(run / "open_clip_model.safetensors").keys() == load_file(plain_run / "open_clip_model.safetensors").keys()
    for name, tensor in load_file(plain_run / "open_clip_model.safetensors").items():
        assert torch.equal(tensor, load_file(run / "open_clip_model.safetensors")[name]), name
    trained = [r for r in records(run) if "loss" in r]
    assert trained == [r | {"samples_per_s": t["samples_per_s"]} for r, t in zip(records(plain_run), trained)]
    assert trainer.student.clip.training  # back in train mode after the last evaluation


def test_the_student_is_evaluated_in_eval_mode(validated_run):
    _, trainer = validated_run
    modes = []
    hook = trainer.student.clip.visual.register_forward_hook(lambda module, args, out: modes.append(module.training))
    try:
        trainer.student.train()
        trainer.validation(trainer.student_clip, 99, STUDENT)
    finally:
        hook.remove()
    assert modes and not any(modes) and trainer.student.clip.training


def test_a_val_curve_in_metrics_jsonl_and_tensorboard(validated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = validated_run
    val = [r for r in records(run) if "loss" not in r]
    assert [r["step"] for r in val] == [2, 4, 6, 8, 10, 12]
    names = {"val/image_to_text_R@1", "val/image_to_text_R@5", "val/image_to_text_R@10", "val/text_to_image_R@1",
             "val/text_to_image_R@5", "val/text_to_image_R@10", "val/clip_val_loss", "val/zeroshot-top1",
             "val/zeroshot-top5", "val/zeroshot-mean_per_class_recall"}
    assert all(set(r) == names | {"step"} for r in val)
    assert val[-1]["val/clip_val_loss"] < val[0]["val/clip_val_loss"]  # it learns
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert names <= set(events.Tags()["scalars"])
    for name in names:
        assert {e.step: e.value for e in events.Scalars(name)} == pytest.approx({r["step"]: r[name] for r in val},
                                                                                  rel=1e-6), name


def test_val_numbers_are_what_kd_eval_gives_on_the_saved_weights(synth_corpus, validated_run, tmp_path):
    run, _ = validated_run
    val = {r["step"]: r for r in records(run) if "loss" not in r}
    best = json.loads((run / "checkpoints" / "history.json").read_text())["best"]["step"]
    # the latest weights (the run folder) and the best step's folder, by local-dir: and by --checkpoint
    for step, model in ((12, ["--model", f"local-dir:{run}"]),
                        (best, ["--model", STUDENT, "--checkpoint",
                                run / "checkpoints" / f"step_{best:06d}" / "open_clip_model.safetensors"])):
        retrieval = kd_eval("retrieval", *model, "--data", synth_corpus / "val", "--batch-size", 32,
                            "--output", tmp_path / "r.json")["metrics"]
        for k in (1, 5, 10):
            assert val[step][f"val/image_to_text_R@{k}"] == retrieval[f"text_retrieval_recall@{k}"]
            assert val[step][f"val/text_to_image_R@{k}"] == retrieval[f"image_retrieval_recall@{k}"]
        zeroshot = kd_eval("zeroshot", *model, "--data", synth_corpus / "zeroshot", "--batch-size", 32,
                           "--output", tmp_path / "z.json")["metrics"]
        assert (val[step]["val/zeroshot-top1"], val[step]["val/zeroshot-top5"]) == (zeroshot["acc1"], zeroshot["acc5"])


def test_keep_2_leaves_two_step_folders_that_load(plain_run):
    folders = sorted(p.name for p in (plain_run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step_000008", "step_000012"]
    latest, _, _ = open_clip.create_model_and_transforms(f"local-dir:{plain_run / 'checkpoints' / 'step_000012'}")
    assert weights_fingerprint(latest) == json.loads((plain_run / "provenance.json").read_text())["student"]["fingerprint"]
    earlier = create_clip(f"local-dir:{plain_run / 'checkpoints' / 'step_000008'}")
    by_checkpoint = create_clip(STUDENT, str(plain_run / "checkpoints" / "step_000008" / "open_clip_model.safetensors"))
    assert earlier.fingerprint == by_checkpoint.fingerprint != weights_fingerprint(latest)


def test_keep_best_keeps_the_best_step_and_the_card_says_it(validated_run):
    run, _ = validated_run
    saved = {r["step"]: r["val/image_to_text_R@5"] for r in records(run) if "loss" not in r and r["step"] % 4 == 0}
    best = max(saved, key=lambda step: (saved[step], -step))
    history = json.loads((run / "checkpoints" / "history.json").read_text())
    assert history["best"] == {"step": best, "metric": "val/image_to_text_R@5", "value": saved[best]}
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == \
        sorted({f"step_{best:06d}", "step_000012"})
    card = (run / "README.md").read_text()
    assert "The weights in this folder are step 12's, the latest saved." in card
    assert f"Best by `val/image_to_text_R@5`: step {best} ({saved[best]:.4f})" in card
    results = json.loads((run / "eval_results.json").read_text())  # as kd-eval --update-card records them
    assert {r["task"] for r in results.values()} == {"zeroshot_retrieval", "zeroshot_classification"}
    last = [r for r in records(run) if "loss" not in r][-1]
    fingerprint = json.loads((run / "provenance.json").read_text())["student"]["fingerprint"]
    assert all(r["weights"] == fingerprint for r in results.values())  # of the weights in the folder: step 12's
    assert f"| text_retrieval_recall@5 | {last['val/image_to_text_R@5']:.4f} |" in card


def test_keep_best_and_val_every_need_a_validation_metric(synth_corpus, tmp_path):
    with pytest.raises(ValueError, match="--keep-best needs a validation split: give --val-data"):
        Trainer(options(synth_corpus, tmp_path / "a", keep_best="val/image_to_text_R@1"))
    with pytest.raises(ValueError, match=r"--keep-best val/i2t: the validation gives val/image_to_text_R@1, "):
        Trainer(options(synth_corpus, tmp_path / "b", val_data=str(synth_corpus / "val"), keep_best="val/i2t"))


def test_resume_auto_twice_equals_one_uninterrupted_run(synth_corpus, plain_run, tmp_path):
    out = tmp_path / "requeued"
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", *cli_args(synth_corpus, out, "--keep", 2,
                                                                                   "--resume", "auto")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not ((out / "metrics.jsonl").exists() and len(records(out)) >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = torch.load(out / "resume.pt", weights_only=True)["step"]
    assert stopped < STEPS and f"Stopped by SIGTERM after step {stopped}" in stderr
    assert "run the same command again" in stderr
    Trainer(options(synth_corpus, out, keep=2, resume="auto")).run()  # the same command, requeued
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    for name in ("open_clip_model.safetensors", "checkpoints/step_000008/open_clip_model.safetensors"):
        ours, straight = load_file(out / name), load_file(plain_run / name)
        assert all(torch.equal(ours[k], straight[k]) for k in straight), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_000008", "step_000012"]


def test_resume_auto_refuses_a_run_stopped_before_its_first_save(synth_corpus, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    with pytest.raises(ValueError, match="holds a run that stopped before its first save .no resume.pt., so there is "
                                         "nothing to resume: start it again with --overwrite"):
        Trainer(options(synth_corpus, out, resume="auto"))
