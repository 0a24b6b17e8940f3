"""What protects a run and a store: signals, non-finite numbers, one writer per output, full disks, broken stores,
errors from DataLoader workers. Real processes, real checkpoints and stores."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from common.errors import Interrupted, NonFiniteError, reported_errors, user_message
from common.lock import OutputLocked, lock_path, output_lock
from common.storage import as_disk_full
from common.synth import make_sample, write_shard
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import REPO, cli, invoke

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"


@pytest.fixture(scope="module")
def cache(train_store) -> Path:
    return train_store  # conftest's, shared


def train_args(synth_corpus: Path, *extra) -> list[str]:
    return ["--data", str(synth_corpus / "train"), "--student", STUDENT, "--batch-size", "32", "--workers", "0",
            "--log-every", "1", *map(str, extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int) -> None:
    while proc.poll() is None and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= steps):
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before the signal"


def test_sigterm_saves_and_resume_reproduces_the_run(synth_corpus, cache, tmp_path):
    args = train_args(synth_corpus, "--cache", cache, "--losses", "task,fd,icl,crd", "--steps", 12, "--warmup", 2,
                      "--save-every", 1000)
    invoke("stage2_student.cli", "--out", tmp_path / "straight", *args)
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", "--out", str(out), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = torch.load(out / "resume.pt", weights_only=True)  # saved at the step boundary, not at --save-every
    assert 3 <= saved["step"] < 12 and f"Stopped by SIGTERM after step {saved['step']}: saved" in stderr
    assert "continue with the same command plus --resume" in stderr
    assert "Traceback" not in stderr and "Error" not in stderr  # a stop that was asked for, not an error
    before_ensembles = tmp_path / "before_ensembles"
    shutil.copytree(out, before_ensembles)
    write_as_before_ensembles(before_ensembles / "resume.pt")
    straight = metrics(tmp_path / "straight")
    for stopped in (out, before_ensembles):
        invoke("stage2_student.cli", "--out", stopped, "--resume", *args)
        resumed = metrics(stopped)
        assert [m["step"] for m in resumed] == list(range(1, 13))
        for a, b in zip(straight, resumed):
            for key in ("loss", "task", "fd", "icl", "crd", "lr", "cache_hits", "live_batches"):  # counters continue
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (stopped.name, a["step"], key)


def write_as_before_ensembles(path: Path) -> None:
    """Rewrite a resume.pt with the names kd-train gave it before ensembles (commit 1df72f4): no 'teachers' or
    'synthetic_captions' option, the projection proj_image/proj_text, loss parts directly under the loss, the
    counters at the top level. (A file that commit wrote resumes bit-identically too; it is 20 MB, so not kept.)"""
    state = torch.load(path, weights_only=True)
    options = {k: v for k, v in json.loads(state["options"]).items() if k not in ("teachers", "synthetic_captions")}
    hits, live = state.pop("target_counts")["main"]
    torch.save(state | {
        "options": json.dumps(options), "cache_hits": hits, "live_batches": live,
        "student": {re.sub(r"^projections\.main\.(image|text)\.", r"proj_\1.", k): v for k, v in state["student"].items()},
        "losses": {k.replace(".members.main.", "."): v for k, v in state["losses"].items()},
    }, path)


def test_each_epoch_end_is_saved(synth_corpus, tmp_path):
    """192 samples / 32 = 6 steps an epoch; --save-every never fires: a kill in epoch 2 keeps the end of epoch 1."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", "--out", str(out),
                             *train_args(synth_corpus, "--losses", "task", "--epochs", 3, "--save-every", 1000)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(proc, out, 8)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it was killed"
    saved = torch.load(out / "resume.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) in ((6, 1, 0), (12, 2, 0))


def test_non_finite_loss_stops_naming_step_and_terms(synth_corpus, tmp_path):
    """lr 1e30: finite but huge weights after step 1, so step 2's loss overflows."""
    out = tmp_path / "run"
    result = invoke("stage2_student.cli", "--out", out, *train_args(synth_corpus, "--losses", "task", "--lr", "1e30",
                    "--warmup", 0, "--steps", 4, "--save-every", 1), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "step 2: non-finite loss term(s) {'loss': nan, 'task': nan}" in result.stderr, result.stderr[-2000:]
    assert f"({out} keeps step 1)" in result.stderr
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 1
    state = load_file(out / "open_clip_model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_non_finite_weights_are_never_saved(synth_corpus, tmp_path):
    trainer = Trainer(TrainOptions(data=str(synth_corpus / "train"), out=str(tmp_path / "run"), student=STUDENT,
                                   losses="task", batch_size=32, steps=1, warmup=0, workers=0))
    trainer.run()
    saved = (tmp_path / "run" / "open_clip_model.safetensors").read_bytes()
    with torch.no_grad():
        trainer.student.clip.text_projection[0, 0] = float("inf")
    trainer.step += 1
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite student weights .*text_projection"):
        trainer.save(0, 2)
    assert (tmp_path / "run" / "open_clip_model.safetensors").read_bytes() == saved


def lock_holder(out: Path) -> subprocess.Popen:
    """Another live process holding `out`'s lock, as a running kd-train or kd-cache build does; it ends normally
    when its stdin is closed."""
    code = ("import sys; from common.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_takes_over_a_killed_ones_lock(synth_corpus, cache, tmp_path):
    run, store = tmp_path / "run", tmp_path / "store.zarr"
    build = ["build", "--teacher", TEACHER, "--data", synth_corpus / "val", "--out", store, "--batch-size", 16,
             "--grad-batch", 16, "--chunk-rows", 16, "--workers", 0]
    for out, command in ((run, ("stage2_student.cli", "--out", run, *train_args(synth_corpus, "--losses", "task",
                                                                                 "--steps", 1))),
                         (store, ("stage1_teacher.cli", *build))):
        holder = lock_holder(out)
        try:
            refused = invoke(*command, check=False)
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert refused.returncode == 1 and f"being written by another process (pid {holder.pid}" in refused.stderr
        assert not out.exists()  # refused before writing anything
        assert lock_path(out).read_text().strip() == str(holder.pid)  # SIGKILL: its file stays, unlocked
        invoke(*command)  # takes the stale file over, and removes it at its end
        assert not lock_path(out).exists()


def test_no_lock_file_or_folder_stays_behind_an_end_or_a_refusal(tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError, match="refused"), output_lock(str(out)):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        raise ValueError("refused")  # as kd-train's check of --out, after taking the lock
    assert not (tmp_path / "new").exists()  # the folders made for the lock file went with it
    with output_lock(str(out)):
        out.mkdir()
    assert [p.name for p in out.parent.iterdir()] == ["run"]


def test_a_lock_released_by_its_holder_is_taken_by_the_next_writer_without_a_file_left(tmp_path):
    out = tmp_path / "run"
    holder = lock_holder(out)
    with pytest.raises(OutputLocked, match=f"pid {holder.pid}"), output_lock(str(out)):
        pass
    holder.stdin.close()  # a normal end: it unlinks its file, then releases the lock
    assert holder.wait() == 0 and not lock_path(out).exists()
    with output_lock(str(out)):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_kd_train_refused_after_the_lock_leaves_no_lock_and_no_folder(synth_corpus, tmp_path):
    out = tmp_path / "runs" / "new"
    refused = invoke("stage2_student.cli", "--out", out, "--resume", *train_args(synth_corpus, "--losses", "task"),
                     check=False)
    assert refused.returncode == 1 and "holds no run to continue" in refused.stderr
    assert list(tmp_path.iterdir()) == []


def test_remote_outputs_are_not_locked(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="kd-lock")
    with output_lock("s3://bucket/store.zarr"):
        assert not list(tmp_path.rglob("*"))  # no lock file, not even a local s3: folder
    assert "--out s3://bucket/store.zarr is remote: not locked" in caplog.text


def test_a_signal_stop_is_reported_as_a_stop_with_exit_code_128_plus_signum():
    @click.command()
    def stopped():
        with reported_errors():
            raise Interrupted("Stopped by SIGINT after step 7: saved run/resume.pt; continue with the same command "
                              "plus --resume", signal.SIGINT)

    result = CliRunner().invoke(stopped)
    assert result.exit_code == 128 + signal.SIGINT
    assert result.output == ("Stopped by SIGINT after step 7: saved run/resume.pt; continue with the same command "
                             "plus --resume\n")


def test_disk_full_errors_are_one_line_naming_the_path():
    """Real ENOSPC: /dev/full fails every write, for open() and for torch.save's zip writer."""
    with pytest.raises(OSError) as raised:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 8192)
            f.flush()
    assert raised.value.errno == errno.ENOSPC
    assert user_message(raised.value, out="cache.zarr") == ("no space left on the device writing cache.zarr: free "
                                                            "space there and re-run the same command")
    with pytest.raises(RuntimeError) as saved:
        torch.save({"x": torch.zeros(10_000)}, "/dev/full")
    message = user_message(as_disk_full(saved.value, "runs/x/resume.pt"))
    assert message == ("no space left on the device writing runs/x/resume.pt: free space there and re-run the "
                       "same command")


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs mount rights: root in a sandbox)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the /dev/full test covers the mapping)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_during_checkpoint_and_build_is_one_line_without_leftovers(synth_corpus, cache, tiny_disk):
    run = tiny_disk / "run"  # open_clip_model.safetensors (several MB) cannot fit
    result = invoke("stage2_student.cli", "--out", run, *train_args(synth_corpus, "--losses", "task", "--steps", 1),
                    check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no space left on the device writing {run / 'open_clip_model.safetensors'}: free space" in result.stderr
    assert not list(run.glob("*.tmp"))
    verbose = cli("stage2_student.cli", "-v", "--out", tiny_disk / "run2",
                  *train_args(synth_corpus, "--losses", "task", "--steps", 1), check=False)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr  # -v shows where it happened
    (run / "metrics.jsonl").unlink()
    shutil.rmtree(tiny_disk / "run2")
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # leave 64 KiB: the store's first chunks do not fit
    store = tiny_disk / "store.zarr"
    built = invoke("stage1_teacher.cli", "build", "--teacher", TEACHER, "--data", synth_corpus / "val", "--out", store,
                   "--batch-size", 16, "--grad-batch", 16, "--chunk-rows", 16, "--workers", 0, check=False)
    assert built.returncode == 1 and "Traceback" not in built.stderr
    assert f"no space left on the device writing {store}" in built.stderr and "re-run the same command" in built.stderr


def test_broken_store_metadata_is_one_line_naming_the_store(synth_corpus, cache, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache, broken)
    (broken / "zarr.json").write_text((broken / "zarr.json").read_text()[:-20])
    info = invoke("stage1_teacher.cli", "info", broken, check=False)
    train = invoke("stage2_student.cli", "--out", tmp_path / "run", "--cache", broken,
                   *train_args(synth_corpus, "--losses", "fd", "--steps", 1), check=False)
    for result in (info, train):
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"store {broken} has a broken metadata file" in result.stderr and "rebuild it" in result.stderr


def test_bad_sample_in_a_dataloader_worker_is_the_one_line_message(tmp_path):
    shards = tmp_path / "bad"
    shards.mkdir()
    samples = [make_sample(0, "train", i, f"{i:09d}", image_size=32) for i in range(8)]
    samples[5]["jpg"] = b"not a jpeg"
    write_shard(shards / "00000.tar", samples)
    results = [invoke("stage2_student.cli", "--data", shards, "--student", STUDENT, "--losses", "task", "--out",
                      tmp_path / f"run{workers}", "--batch-size", 4, "--steps", 2, "--workers", workers, check=False)
               for workers in (0, 1)]
    # one line each, the same but for the address of the BytesIO that PIL names
    lines = [re.sub(r"0x[0-9a-f]+", "0x", line) for r in results for line in r.stderr.splitlines()
             if line.startswith("Error: ")]
    assert len(lines) == 2 and lines[0] == lines[1] and "00000.tar, key 000000005: undecodable image" in lines[0]
    assert all(r.returncode == 1 and "Caught" not in r.stderr and "Traceback" not in r.stderr for r in results)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_kd_train_on_one_out_one_is_refused_and_workers_die_quietly_with_a_killed_run(synth_corpus, tmp_path):
    """A second kd-train on a running one's --out is refused naming the first; then the first is SIGKILLed: its
    DataLoader workers die with it. (One long run serves both checks.)"""
    out = tmp_path / "run"
    args = ["--out", str(out), *train_args(synth_corpus, "--losses", "task", "--steps", 1000, "--save-every", 1000,
                                           "--workers", 2)]
    proc = subprocess.Popen([sys.executable, "-m", "stage2_student.cli", *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(proc, out, 1)
        second = invoke("stage2_student.cli", *args, check=False)
        assert second.returncode == 1 and f"pid {proc.pid}" in second.stderr
        done = len(metrics(out))
        wait_for_steps(proc, out, done + (2 - done) % 6)  # step 2 of an epoch (6 steps): its workers are up
        workers = children_of(proc.pid)
        assert len(workers) >= 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 1  # torch's own watchdog alone takes up to 5 s
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers)), "DataLoader workers outlived their killed parent"
    stderr = proc.stderr.read()  # at its end: no writer is left
    assert "Traceback" not in stderr and "ConnectionResetError" not in stderr, stderr[-2000:]
