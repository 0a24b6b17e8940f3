"""Test helpers shared across test modules: real checkpoints, real CLI runs (as processes or in-process)."""
from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import open_clip
import torch
import zarr
from click.testing import CliRunner

import common.models  # noqa: F401 - registers the kd-* configs with open_clip
from common.families import initialize_left_empty

REPO = Path(__file__).resolve().parents[1]
STORE_TEACHER = "kd-test-teacher"  # the teacher of conftest's shared stores
# their build options: 3 windows of 2 blocks of 32 rows over the 192 train samples, gradient batches of 32
STORE_OPTIONS = dict(batch_size=16, grad_batch=32, chunk_rows=32, window_blocks=2, workers=0)


def save_random_checkpoint(model_name: str, path: Path, seed: int) -> Path:
    """A real open_clip state_dict on disk, from a seeded random init (stands in for pretrained weights)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    initialize_left_empty(model)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _run(command: list, what: str, check: bool, env: dict | None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{what} failed:\n{result.stdout}\n{result.stderr}")
    return result


def cli(module: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a real process from the repo root."""
    args = [str(a) for a in args]
    return _run([sys.executable, "-m", module, *args], f"{module} {' '.join(args)}", check, env)


def invoke(module: str, *args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cli` without a new interpreter (each one costs ~9 s of CPU for its imports): the module's click command
    through click's CliRunner, for tests where the command's work, not the process, is under test. stderr holds
    what the process would print there: its log lines (INFO and up, the CLIs' format), click's error report, and
    the traceback of an error that escaped (which the real process prints)."""
    args = [str(a) for a in args]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the CLIs' basicConfig is a no-op under pytest, whose handlers root already has
    try:
        result = CliRunner().invoke(importlib.import_module(module).main, args, env=env)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    stderr = stream.getvalue() + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    done = subprocess.CompletedProcess([module, *args], result.exit_code, result.stdout, stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def torchrun(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node 2 -m module args` (two CPU ranks, gloo) from the repo root."""
    args = [str(a) for a in args]
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
                 *args], f"torchrun -m {module} {' '.join(args)}", check, {"OMP_NUM_THREADS": "1"})


def plain_keys(group: zarr.Group) -> list[str]:
    """Every row's key, read with plain zarr from the store's corpus index (docs/cache-format.md)."""
    blob, ends = bytes(group["index/key_bytes"][...]), group["index/key_ends"][...]
    return [blob[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]


def assert_stores_equal(a, b, skip=("blocks_done", "index/urls", "index/versions")) -> None:
    """Every array bit-identical (the corpus index's too), and the same content-defining attrs."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = lambda g: sorted(n for n, node in g.members(max_depth=None) if isinstance(node, zarr.Array))  # noqa: E731
    assert names(ga) == names(gb)
    for name in names(ga):
        if name in skip:
            continue
        x, y = ga[name][...], gb[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"array {name} differs"
    for key in ("teacher", "corpus", "build", "embed_dim", "teacher_logit_scale", "grad_scale", "invalid_count",
                "complete", "content_hash"):
        assert ga.attrs[key] == gb.attrs[key], key


def fill_hf_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay `files` into a Hugging Face cache the way a finished `hf_hub_download` leaves them: content-addressed
    blobs, a snapshot folder of links named by a commit, and refs/main naming that commit. Returns the snapshot."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    contents = {name: Path(path).read_bytes() for name, path in files.items()}
    commit = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(contents.items()))).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def offline_hub_env(hf_home: Path) -> dict:
    """Environment of a process that reads hub models from `hf_home` only, as on a machine without network."""
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def save_tiny_hf_tokenizer(folder: Path, words: list[str], max_length: int) -> Path:
    """A BERT-style word-level tokenizer made with the `tokenizers` package, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length)
    fast.save_pretrained(folder)
    return folder
