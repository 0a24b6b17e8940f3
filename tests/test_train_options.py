"""Options and outputs of the CLIs: nonsense refused at parse time, --out protection, warm-up cap, ranks, the
summary lines, open_clip_config.json, errors a person can act on."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import click
import pytest
import torch
from click.testing import CliRunner
from torch.distributed.run import get_args_parser

from evaluation.cli import main as kd_eval
from stage1_teacher.cli import main as kd_cache
from stage2_student.cli import main as kd_train
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import REPO, cli, save_random_checkpoint, torchrun

STUDENT, TEACHER = "kd-test-student", "kd-test-teacher"


def tiny_run(synth_corpus, *extra) -> list[str]:
    return ["--data", str(synth_corpus / "train"), "--student", STUDENT, "--losses", "task", "--batch-size", "32",
            "--steps", "2", "--workers", "0", "--log-every", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def trained(synth_corpus, tmp_path_factory) -> tuple:
    """One real `kd-train` of tiny_run (its --out folder and its process result), shared read-only: copy it to
    change it."""
    run = tmp_path_factory.mktemp("train_options") / "run"
    return run, cli("stage2_student.cli", "--out", run, *tiny_run(synth_corpus))


@pytest.mark.parametrize("command, args, option", [
    (kd_train, ["--grad-clip", "-1"], "--grad-clip"),
    (kd_train, ["--steps", "0"], "--steps"),
    (kd_train, ["--steps", "-3"], "--steps"),
    (kd_train, ["--epochs", "0"], "--epochs"),
    (kd_train, ["--epochs", "-1"], "--epochs"),
    (kd_train, ["--save-every", "0"], "--save-every"),
    (kd_train, ["--log-every", "0"], "--log-every"),
    (kd_train, ["--shuffle-buffer", "0"], "--shuffle-buffer"),
    (kd_train, ["--batch-size", "1"], "--batch-size"),
    (kd_train, ["--workers", "-1"], "--workers"),
    (kd_train, ["--lr", "0"], "--lr"),
    (kd_train, ["--lr", "-1e-3"], "--lr"),
    (kd_train, ["--target-memory-gb", "0"], "--target-memory-gb"),
    (kd_train, ["--warmup", "-5"], "--warmup"),
    (kd_train, ["--target-memory-gb", "nan"], "--target-memory-gb"),
    (kd_train, ["--target-memory-gb", "inf"], "--target-memory-gb"),
    (kd_train, ["--wd", "nan"], "--wd"),
    (kd_train, ["--grad-clip", "nan"], "--grad-clip"),
    (kd_train, ["--lr", "inf"], "--lr"),
    (kd_train, ["--synthetic-captions", "nan"], "--synthetic-captions"),
    (kd_train, ["--losses", "task,fd:1e400"], "--losses"),
    (kd_train, ["--seed", str(2**64)], "--seed"),
    (kd_cache, ["build", "--seed", "-1"], "--seed"),
    (kd_cache, ["build", "--seed", str(2**64)], "--seed"),
    (kd_cache, ["build", "--batch-size", "0"], "--batch-size"),
    (kd_cache, ["build", "--grad-batch", "1"], "--grad-batch"),
    (kd_cache, ["build", "--views", "-1"], "--views"),
    (kd_cache, ["build", "--workers", "-2"], "--workers"),
    (kd_cache, ["build", "--chunk-rows", "0"], "--chunk-rows"),
    (kd_eval, ["retrieval", "--batch-size", "0"], "--batch-size"),
    (kd_eval, ["zeroshot", "--workers", "-1"], "--workers"),
    (kd_eval, ["compare", "--batch-size", "-4"], "--batch-size"),
])
def test_nonsense_options_are_refused_at_parse_time(synth_corpus, tmp_path, command, args, option):
    required = {kd_train: ["--data", str(synth_corpus / "train"), "--student", STUDENT, "--out", str(tmp_path / "r")],
                kd_cache: ["--teacher", TEACHER, "--data", str(synth_corpus / "train"), "--out", str(tmp_path / "s")],
                kd_eval: ["--data", str(synth_corpus / "val")]}[command]
    subcommand = args[:1] if command is not kd_train else []
    result = CliRunner().invoke(command, [*subcommand, *required, *args[len(subcommand):]])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_unquoted_brace_pattern_says_to_quote_it(synth_corpus, tmp_path):
    shards = sorted(str(p) for p in (synth_corpus / "train").glob("*.tar"))  # what the shell makes of {0..2}
    result = cli("stage2_student.cli", "--data", *shards, "--student", STUDENT, "--out", tmp_path / "r", check=False)
    assert result.returncode == 2 and "unexpected extra arguments" in result.stderr
    assert "quote it, e.g. --data 'shards/{00000..00099}.tar'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_one_line(synth_corpus, tmp_path):
    for command, args in ((kd_train, tiny_run(synth_corpus, "--out", tmp_path / "r")),
                          (kd_eval, ["retrieval", "--model", STUDENT, "--random-weights", "--data",
                                     str(synth_corpus / "val")])):
        result = CliRunner().invoke(command, [*args, "--device", "cuda"])
        assert result.exit_code == 2 and "torch sees no GPU here" in result.output and "--device cpu" in result.output


def test_file_that_is_not_a_checkpoint_is_one_line_without_unsafe_advice(synth_corpus, tmp_path):
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("these are not weights\n")
    results = [cli("evaluation.cli", "retrieval", "--model", STUDENT, "--checkpoint", not_ckpt, "--data",
                   synth_corpus / "val", check=False),
               cli("stage2_student.cli", "--out", tmp_path / "r", *tiny_run(synth_corpus, "--init", not_ckpt),
                   check=False),
               cli("stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", not_ckpt, "--data",
                   synth_corpus / "val", "--out", tmp_path / "s.zarr", check=False)]
    for result in results:
        assert result.returncode == 1 and f"{not_ckpt} is not a checkpoint of tensors" in result.stderr
        assert "Traceback" not in result.stderr and "weights_only" not in result.stderr


def test_eval_needs_a_checkpoint_or_random_weights(synth_corpus):
    base = ["--model", STUDENT, "--data", str(synth_corpus / "val"), "--workers", "0"]
    for command in (["retrieval"], ["zeroshot", "--classnames", str(synth_corpus / "zeroshot" / "classnames.txt")]):
        refused = CliRunner().invoke(kd_eval, [*command, *base])
        assert refused.exit_code == 2 and "give --checkpoint" in refused.output and "--random-weights" in refused.output
    explicit = CliRunner().invoke(kd_eval, ["retrieval", *base, "--random-weights"])
    assert explicit.exit_code == 0, explicit.output


def test_out_is_refused_unless_resume_or_overwrite(synth_corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    first = (run / "open_clip_model.safetensors").read_bytes()
    again = cli("stage2_student.cli", "--out", run, *tiny_run(synth_corpus, "--seed", 1), check=False)
    assert again.returncode == 1 and f"--out {run} holds a run" in again.stderr and "--overwrite" in again.stderr
    assert (run / "open_clip_model.safetensors").read_bytes() == first
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"mine")
    into = cli("stage2_student.cli", "--out", unrelated, *tiny_run(synth_corpus), check=False)
    assert into.returncode == 1 and "is a non-empty directory" in into.stderr
    (run / "resume.pt").unlink()  # a stale file of the old run must not survive --overwrite
    (run / "notes.md").write_text("kept")
    cli("stage2_student.cli", "--out", run, "--overwrite", *tiny_run(synth_corpus, "--seed", 1, "--save-every", 1000,
                                                                         "--steps", 1))
    assert (run / "open_clip_model.safetensors").read_bytes() != first and (run / "notes.md").read_text() == "kept"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    both = CliRunner().invoke(kd_train, [*tiny_run(synth_corpus), "--out", str(run), "--resume", "--overwrite"])
    assert both.exit_code == 1 and "give one of them" in both.output


def test_warmup_is_capped_to_a_tenth_of_the_run(synth_corpus, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kd-train")
    trainer = Trainer(TrainOptions(data=str(synth_corpus / "train"), out=str(tmp_path / "run"), student=STUDENT,
                                   losses="task", batch_size=32, steps=20, warmup=10000, workers=0, lr=1e-3,
                                   log_every=1))
    assert trainer.warmup == 2
    assert "--warmup 10000 is more than 10% of the 20 steps: warming up for 2 steps instead" in caplog.text
    last = trainer.run()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12) and last["step"] == 20
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == pytest.approx([1e-3, 1e-3])  # from step 2 on: the full rate, not 2/10000 of it
    assert json.loads((tmp_path / "run" / "options.json").read_text())["warmup_steps"] == 2


def test_summary_lines_of_kd_train_and_kd_cache_build(synth_corpus, trained, tmp_path):
    run, result = trained
    summary = result.stdout.strip()  # one readable line, the last of stdout; the numbers are in metrics.jsonl
    loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert summary.startswith(f"kd-train: wrote {run} (an open_clip hub folder: local-dir:{run}): step 2 of 2, "
                              f"loss {loss:.4f}; steps 1-2, 64 samples in ") and "samples/s)" in summary
    assert "{" not in summary
    assert "Parsing model identifier" not in result.stderr  # open_clip's own chatter stays quiet
    ckpt = save_random_checkpoint(TEACHER, tmp_path / "teacher.pt", seed=1)
    built = cli("stage1_teacher.cli", "build", "--teacher", TEACHER, "--pretrained", ckpt, "--data",
                synth_corpus / "val", "--out", tmp_path / "s.zarr", "--batch-size", 16, "--grad-batch", 16,
                "--chunk-rows", 16, "--workers", 0)
    assert f"kd-cache: wrote {tmp_path / 's.zarr'}: 48 rows" in built.stderr


def _long_options(command: click.Command, path: str):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _long_options(sub, f"{path} {name}")
    else:
        yield from ((path, opt) for param in command.params for opt in param.opts if opt.startswith("--"))


def test_no_cli_option_is_taken_by_torchrun_after_the_module():
    """torchrun's argparse matches abbreviations even among the module's arguments: `-m stage1_teacher.cli captions
    --num 5` failed as an ambiguous `--numa-binding`. No option of ours may be a prefix of one of torchrun's."""
    theirs = [opt for action in get_args_parser()._actions for opt in action.option_strings if opt.startswith("--")]
    ours = [*_long_options(kd_cache, "kd-cache"), *_long_options(kd_train, "kd-train"),
            *_long_options(kd_eval, "kd-eval")]
    assert len(ours) > 60 and ("kd-cache captions", "--per-image") in ours
    taken = [(path, opt, [t for t in theirs if t.startswith(opt)]) for path, opt in ours
             if any(t.startswith(opt) for t in theirs)]
    assert taken == []


def test_two_ranks_refuse_an_indivisible_batch_and_gather_without_deprecated_api(synth_corpus, tmp_path):
    def two_ranks(out, batch_size):
        return torchrun("stage2_student.cli", "--out", out, *tiny_run(synth_corpus, "--batch-size", batch_size,
                                                                        "--steps", 1), check=False)
    refused = two_ranks(tmp_path / "odd", 33)
    assert refused.returncode != 0 and not (tmp_path / "odd").exists()
    assert "--batch-size 33 is not divisible by the world size 2" in refused.stderr
    assert "Received data size" not in refused.stderr
    ran = two_ranks(tmp_path / "even", 32)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "all_gather is deprecated" not in ran.stderr  # torch.distributed.nn's all_gather warned on every step
    assert not (tmp_path / "even.lock").exists()  # rank 0 held the lock and removed it at its end


def test_resume_refuses_changed_trajectory_options_and_records_the_changes_it_allows(synth_corpus, tmp_path):
    run = tmp_path / "run"
    cli("stage2_student.cli", "--out", run, *tiny_run(synth_corpus, "--save-every", 1))
    options = (run / "options.json").read_text()
    for changed, said in ((["--grad-clip", "1.0"], "--grad-clip None -> 1.0"),
                          (["--precision", "bf16"], "--precision fp32 -> bf16")):
        refused = cli("stage2_student.cli", "--out", run, "--resume", *tiny_run(synth_corpus, *changed), check=False)
        assert refused.returncode == 1 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert "give the original ones" in refused.stderr
        assert (run / "options.json").read_text() == options
    cli("stage2_student.cli", "--out", run, "--resume", *tiny_run(synth_corpus, "--save-every", 1, "--log-every", 2,
                                                                 "--on-error", "skip"))
    recorded = json.loads((run / "options.json").read_text())
    assert recorded["log_every"] == 1 and recorded["on_error"] == "raise" and recorded["grad_clip"] is None
    assert recorded["changes"] == [{"from_step": 3, "log_every": 2, "on_error": "skip"}]


def test_a_run_killed_before_its_first_save_gets_one_answer(synth_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_run(synth_corpus, "--steps", 1000, "--save-every", 1000)
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", "--out", str(run), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and not (run / "resume.pt").exists()
    answer = f"--out {run} holds a run that stopped before its first save (no resume.pt), so there is nothing to resume"
    for extra in ([], ["--resume"]):
        result = cli("stage2_student.cli", "--out", run, *extra, *args, check=False)
        assert result.returncode == 1 and answer in result.stderr and "start it again with --overwrite" in result.stderr
    cli("stage2_student.cli", "--out", run, "--overwrite", *tiny_run(synth_corpus))
    empty = cli("stage2_student.cli", "--out", tmp_path / "new", "--resume", *tiny_run(synth_corpus), check=False)
    assert empty.returncode == 1 and "holds no run to continue (no resume.pt): start without --resume" in empty.stderr


@pytest.mark.parametrize("args", [["--chunk-rows", 10**12], ["--window-blocks", 10**9], ["--views", 100000]])
def test_a_build_the_machine_cannot_hold_is_refused_before_its_store_exists(synth_corpus, tmp_path, args):
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(kd_cache, ["build", "--teacher", TEACHER, "--data", str(synth_corpus / "val"),
                                           "--out", str(out), "--workers", "0", *map(str, args)])
    assert result.exit_code == 1 and "a build needs at least" in result.output and "lower them" in result.output
    assert "more than this machine's" in result.output and not out.exists(), result.output


def test_a_zero_loss_weight_warns(synth_corpus, tmp_path):
    result = cli("stage2_student.cli", "--out", tmp_path / "r", *tiny_run(synth_corpus, "--losses", "task:0",
                                                                          "--steps", 1))
    assert "--losses task:0: task has weight 0, so it adds nothing to the loss" in result.stderr
