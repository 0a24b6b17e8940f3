"""A kd-train student loads in plain open_clip, with the two lines of the README ("Loading a student with plain
open_clip"): the run's `open_clip_config.json` registered with `open_clip.add_model_config`, then
`create_model_and_transforms` on `student.pt`, in a Python process that imports only open_clip and torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from common.models import create_clip
from tests.helpers import cli

STUDENT = "kd-test-student"
CONFIG_FILE = "open_clip_config.json"  # the name kd-train writes next to student.pt (README)

# the README's two lines, then what a user does next; fails if anything of this package gets imported
PLAIN_OPEN_CLIP = """
import sys
import open_clip
import torch

run, out = sys.argv[1], sys.argv[2]
open_clip.add_model_config(f"{run}/open_clip_config.json")  # registers the architecture as "open_clip_config"
model, _, preprocess = open_clip.create_model_and_transforms("open_clip_config", pretrained=f"{run}/student.pt")
tokenizer = open_clip.get_tokenizer("open_clip_config")
torch.manual_seed(0)
with torch.no_grad():
    torch.save({"image": model.eval().encode_image(torch.rand(2, 3, *model.visual.image_size)),
                "text": model.encode_text(tokenizer(CAPTIONS))}, out)
ours = [m for m in sys.modules if m.split(".")[0] in ("common", "stage1_teacher", "stage2_student", "evaluation")]
assert not ours, f"imported from this package: {ours}"
"""
CAPTIONS = ["a red square left of a blue circle", "a green star"]


def write_open_clip_config(model_name: str, run: Path) -> Path:
    """The student's open_clip model config dict as `<run>/open_clip_config.json` (what kd-train writes)."""
    path = run / CONFIG_FILE
    path.write_text(json.dumps(open_clip.get_model_config(model_name), indent=2))
    return path


@pytest.fixture(scope="module")
def student_run(synth_corpus, tmp_path_factory) -> Path:
    """A real (one-step) kd-train run; its open_clip_config.json, written here when kd-train does not yet."""
    run = tmp_path_factory.mktemp("plain_open_clip") / "run"
    cli("stage2_student.cli", "--data", synth_corpus / "train", "--student", STUDENT, "--losses", "task",
        "--out", run, "--steps", 1, "--batch-size", 32, "--warmup", 1, "--workers", 0)
    if not (run / CONFIG_FILE).is_file():
        write_open_clip_config(STUDENT, run)
    return run


def test_student_loads_in_plain_open_clip_with_the_readme_lines(student_run, tmp_path):
    out = tmp_path / "embeddings.pt"
    script = PLAIN_OPEN_CLIP.replace("CAPTIONS", repr(CAPTIONS))
    result = subprocess.run([sys.executable, "-c", script, str(student_run), str(out)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plain = torch.load(out, weights_only=True)
    ours = create_clip(STUDENT, str(student_run / "student.pt")).model.eval()  # this package's loader
    torch.manual_seed(0)
    with torch.no_grad():
        image = ours.encode_image(torch.rand(2, 3, *ours.visual.image_size))
        text = ours.encode_text(open_clip.get_tokenizer(STUDENT)(CAPTIONS))
    torch.testing.assert_close(plain["image"], image)
    torch.testing.assert_close(plain["text"], text)
    fresh = open_clip.create_model(STUDENT)  # a random init would not match: the weights were loaded
    assert not torch.allclose(fresh.eval().encode_text(open_clip.get_tokenizer(STUDENT)(CAPTIONS)), text)
