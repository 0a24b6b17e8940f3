"""Ranks that wait for a slow rank-0 phase wait as long as KD_DIST_TIMEOUT_S says, not a backend default."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, save_random_checkpoint

TEACHER = "kd-test-teacher"
# kd-cache build with store creation on rank 0 slowed down by SLOW_S seconds (fault injection around our own step)
SLOW_RANK0 = """
import os, sys, time
import stage1_teacher.build as build
original = build.open_or_create
def slow(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_S"]))
    return original(*args, **kwargs)
build.open_or_create = slow
from stage1_teacher.cli import main
main(prog_name="kd-cache")
"""


def test_a_slow_rank0_phase_is_waited_for_up_to_the_set_timeout(synth_corpus, tmp_path):
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_RANK0)
    ckpt = save_random_checkpoint(TEACHER, tmp_path / "t.pt", seed=0)

    def build(out: str, timeout_s: int):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "build", "--teacher",
             TEACHER, "--pretrained", str(ckpt), "--data", str(synth_corpus / "val"), "--out", str(tmp_path / out),
             "--batch-size", "16", "--grad-batch", "8", "--chunk-rows", "16", "--window-blocks", "1", "--workers", "0"],
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "SLOW_S": "12", "KD_DIST_TIMEOUT_S": str(timeout_s),
                 "PYTHONPATH": str(REPO)})

    survived = build("survives.zarr", timeout_s=120)
    assert survived.returncode == 0, survived.stderr[-3000:]
    assert (tmp_path / "survives.zarr" / "zarr.json").is_file()
    too_short = build("times_out.zarr", timeout_s=3)  # the waiting rank gives up after the set 3 s
    assert too_short.returncode != 0
    assert "timed out" in too_short.stderr.lower() or "timeout" in too_short.stderr.lower()
