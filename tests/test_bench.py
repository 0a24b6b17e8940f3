"""Every bench/ script runs: its --tiny mode (the same measurement code at tiny sizes) as a real process, and it
writes its JSON. A script added without a tiny mode, or without its keys listed in KEYS, fails here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "_common.py")
HEADER = {"title", "machine", "command"}
# what each script's JSON holds besides the header
KEYS = {
    "bench_build.py": {"times_s", "inside_builds", "ratios_vs_forward", "store_sizes", "profile"},
    "bench_cache_chunks.py": {"configs", "logical_bytes"},
    "bench_captions.py": {"runs", "image_tower_s"},
    "bench_ddp.py": {"host_reads", "two_rank_samples_per_s"},
    "bench_faiss.py": {"exact", "approximate"},
    "bench_families.py": {"families"},
    "bench_integrity.py": {"target_copy", "sample_digests"},
    "bench_grad_precision.py": {"grad_max_rel_error_per_batch", "gd_loss_max_rel_diff_over_run"},
    "bench_scale.py": {"sizes", "extrapolated_11M", "ranks", "gradient_window", "stores"},
    "bench_train.py": {"times_s", "ratios", "loader_alone_s", "loader_step_s", "target_agreement_min_cosine"},
    "gpu_check.py": {"build", "train", "agreement", "retrieval", "paths", "goals"},
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_mode_runs_and_writes_its_json(script, tmp_path):
    assert script in KEYS, f"bench/{script}: give it a --tiny mode and list the keys of its JSON in KEYS"
    out = tmp_path / "results.json"
    # TMPDIR: the scripts' scratch directories (bench_scale's corpora too) go under this test's tmp_path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, f"bench/{script}", "--tiny", "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"bench/{script} --tiny failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    missing = (HEADER | KEYS[script]) - set(json.loads(out.read_text()))
    assert not missing, f"bench/{script} --tiny wrote no {sorted(missing)} into its JSON"
