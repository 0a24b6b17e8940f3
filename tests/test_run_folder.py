"""A kd-train run folder is an open_clip hub folder with a model card, and a run reports to TensorBoard / W&B.

- plain open_clip (a process that imports nothing of this package) loads `local-dir:RUN` with the student's own
  preprocessing (a non-default mean/std) and Hugging Face tokenizer (its files copied into the folder), and gets
  kd-train's own student's embeddings;
- runs chain through `local-dir:`: the student of run 1 is the teacher of a cache and the init of run 2;
- run 2's TensorBoard event files (read with tensorboard's own reader) and offline W&B run hold every logged term;
- run 2's model card parses as YAML + markdown and holds its teacher's fingerprint and the `kd-eval --update-card`
  numbers.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from common.corpus import Corpus
from common.model_card import write_model_card
from common.models import ModelError, create_clip, weights_fingerprint
from stage2_student.reporting import parse_report_to
from stage2_student.train import TrainOptions, Trainer
from tests.helpers import cli, save_tiny_hf_tokenizer

MEAN, STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]  # no model's default: only the folder can say them
SAMPLES = 4

# plain open_clip on the run folder: embeddings of the first samples' image bytes and captions
PLAIN_OPEN_CLIP = """
import io, sys
import open_clip, torch
from PIL import Image
run, images, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{run}")
batch = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in images])
with torch.no_grad():
    torch.save({"image": model.eval().encode_image(batch, normalize=True),
                "text": model.encode_text(tokenizer(CAPTIONS), normalize=True),
                "mean": list(preprocess.transforms[-1].mean), "std": list(preprocess.transforms[-1].std),
                "tokenizer": type(tokenizer).__name__}, out)
ours = [m for m in sys.modules if m.split(".")[0] in ("common", "stage1_teacher", "stage2_student", "evaluation")]
assert not ours, f"imported from this package: {ours}"
"""


def kd_eval(*args, exit_code: int = 0):
    """`kd-eval ARGS --workers 0` in this process (click's runner: no interpreter start-up per call)."""
    from click.testing import CliRunner
    from evaluation.cli import main
    result = CliRunner().invoke(main, [*map(str, args), "--workers", "0"])
    assert result.exit_code == exit_code, result.output
    return result


def front_matter(card: Path) -> tuple[dict, str]:
    """A hub model card: its YAML header (parsed) and its markdown body."""
    _, header, body = card.read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B run file (the LevelDB log format W&B writes, after its 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, rows, pending = run_file.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def first_run(synth_corpus, tmp_path_factory) -> dict:
    """Run 1: a hub-folder student with its own mean/std and Hugging Face tokenizer, trained in this process (so
    that kd-train's own student is at hand); that folder is removed afterwards, so only run 1's copy can serve."""
    root = tmp_path_factory.mktemp("run_folder")
    words = {w for s in Corpus.open(str(synth_corpus / "train")).read(0, 64) for w in s.caption.lower().split()}
    source = save_tiny_hf_tokenizer(root / "student", sorted(words), max_length=16)
    config = open_clip.get_model_config("kd-test-student")
    config["text_cfg"] |= {"hf_tokenizer_name": "kd-test/tiny-words"}  # local-dir: reads it from the folder
    (source / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config, "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    torch.manual_seed(0)
    save_file(open_clip.create_model("kd-test-student").state_dict(), source / "open_clip_model.safetensors")
    trainer = Trainer(TrainOptions(data=str(synth_corpus / "train"), out=str(root / "run1"), losses="task",
                                   student=f"local-dir:{source}", batch_size=32, steps=2, warmup=0, workers=0))
    trainer.run()
    samples = list(Corpus.open(str(synth_corpus / "val")).read(0, SAMPLES))
    images = [root / f"{i}.png" for i in range(SAMPLES)]  # lossless: both sides decode the same pixels
    for sample, path in zip(samples, images):
        sample.image.save(path)
    captions = [s.caption for s in samples]
    student = trainer.student_clip
    with torch.no_grad():
        trainer.student.eval()
        batch = torch.stack([student.preprocess(Image.open(path).convert("RGB")) for path in images])
        ours = {"image": trainer.student.clip.encode_image(batch, normalize=True),
                "text": trainer.student.clip.encode_text(student.tokenizer(captions), normalize=True)}
    shutil.rmtree(source)  # from here on only the run folder's copy can serve
    return {"run": root / "run1", "ours": ours, "images": images, "captions": captions,
            "fingerprint": weights_fingerprint(trainer.student.clip)}


def test_plain_open_clip_loads_the_run_folder_with_its_preprocessing_and_tokenizer(first_run, tmp_path):
    run = first_run["run"]
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "README.md"} <= \
        {p.name for p in run.iterdir()}
    assert not list(run.glob("*.pt")) or [p.name for p in run.glob("*.pt")] == ["resume.pt"]
    out = tmp_path / "plain.pt"
    script = PLAIN_OPEN_CLIP.replace("CAPTIONS", repr(first_run["captions"]))
    result = subprocess.run([sys.executable, "-c", script, str(run), *map(str, first_run["images"]), str(out)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(out, weights_only=True)
    assert plain["mean"] == pytest.approx(MEAN) and plain["std"] == pytest.approx(STD)
    assert plain["tokenizer"] == "HFTokenizer"
    torch.testing.assert_close(plain["image"], first_run["ours"]["image"])
    torch.testing.assert_close(plain["text"], first_run["ours"]["text"])
    saved = load_file(run / "open_clip_model.safetensors")
    assert weights_fingerprint(open_clip.create_model("kd-test-student").requires_grad_(False)) != \
        first_run["fingerprint"]  # a random init is not the trained student
    assert json.loads((run / "provenance.json").read_text())["student"]["fingerprint"] == first_run["fingerprint"]
    assert set(saved) == set(open_clip.create_model("kd-test-student").state_dict())


@pytest.fixture(scope="module")
def second_run(synth_corpus, first_run, tmp_path_factory) -> dict:
    """Run 1's student as the teacher of a cache, and as the init of run 2, trained on it with every reporter."""
    root = tmp_path_factory.mktemp("chain")
    store = root / "store.zarr"
    cli("stage1_teacher.cli", "build", "--teacher", f"local-dir:{first_run['run']}", "--data",
        synth_corpus / "train", "--out", store, "--batch-size", 32, "--grad-batch", 32, "--chunk-rows", 64,
        "--workers", 0)
    env = {"WANDB_API_KEY": "", "HOME": str(root), "WANDB_SILENT": "true"}  # no key, no netrc: offline W&B
    trained = cli("stage2_student.cli", "--data", synth_corpus / "train", "--cache", store, "--student",
                  "kd-test-student", "--init", f"local-dir:{first_run['run']}", "--out", root / "run2",
                  "--losses", "task,fd,crd", "--batch-size", 32, "--steps", 3, "--warmup", 0, "--log-every", 1,
                  "--workers", 0, "--report-to", "tensorboard,wandb", env=env)
    return {"run": root / "run2", "store": store, "stderr": trained.stderr}


def test_a_student_teaches_the_next_run_through_local_dir(first_run, second_run):
    import zarr
    teacher = zarr.open_group(str(second_run["store"]), mode="r").attrs["teacher"]
    assert teacher["model"] == f"local-dir:{first_run['run'].resolve()}"
    assert teacher["fingerprint"] == first_run["fingerprint"]
    options = json.loads((second_run["run"] / "options.json").read_text())
    assert options["init"] == f"local-dir:{first_run['run']}"


def test_tensorboard_and_wandb_hold_every_logged_term(second_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = second_run["run"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    numeric = {k for r in logged for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "task", "fd", "crd", "lr", "grad_norm", "samples_per_s", "cache_hit_rate",
            "skipped_samples"} <= numeric
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in numeric}
    for key in numeric:
        points = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert points == pytest.approx({r["step"]: r[key] for r in logged if isinstance(r.get(key), (int, float))},
                                       rel=1e-6), key
    run_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "W&B ran offline, in the run folder"
    history = wandb_history(run_files[0])
    assert [row["_step"] for row in history] == [1, 2, 3]
    for row, record in zip(history, logged):
        assert row["train/loss"] == pytest.approx(record["loss"]) and row["train/fd"] == pytest.approx(record["fd"])


def test_model_card_holds_the_provenance_and_the_eval_numbers(synth_corpus, first_run, second_run, tmp_path):
    run = second_run["run"]
    header, body = front_matter(run / "README.md")
    assert header["library_name"] == "open_clip" and "license" not in header or header["license"] is None
    assert "license:" in (run / "README.md").read_text()  # the field is there, for the user to fill
    assert header["distillation"]["teachers"]["main"]["fingerprint"] == first_run["fingerprint"]
    assert first_run["fingerprint"] in body and "task,fd,crd" in body
    assert header["distillation"]["data"] == {"spec": str(synth_corpus / "train"), "shards": 3, "samples": 192}
    evaluated = kd_eval("retrieval", "--model", f"local-dir:{run}", "--data", synth_corpus / "val", "--output",
                        tmp_path / "r.json", "--update-card", run)
    assert f"wrote {run / 'README.md'}" in evaluated.output
    result = json.loads((tmp_path / "r.json").read_text())
    header, body = front_matter(run / "README.md")
    scores = {m["type"]: m["value"] for r in header["model-index"][0]["results"] for m in r["metrics"]}
    assert scores["image_retrieval_recall@1"] == pytest.approx(result["metrics"]["image_retrieval_recall@1"])
    assert f"| image_retrieval_recall@1 | {result['metrics']['image_retrieval_recall@1']:.4f} |" in body
    assert header["distillation"]["teachers"]["main"]["fingerprint"] == first_run["fingerprint"]  # kept
    (run / "README.md").write_text((run / "README.md").read_text().replace("license:  #", "license: mit  #"))
    other = kd_eval("zeroshot", "--model", f"local-dir:{first_run['run']}", "--data", synth_corpus / "zeroshot",
                    "--update-card", run, exit_code=1)
    assert "is not that run's student as last saved" in other.output and "--model local-dir:" in other.output
    kd_eval("zeroshot", "--model", f"local-dir:{run}", "--data", synth_corpus / "zeroshot", "--update-card", run)
    header, _ = front_matter(run / "README.md")
    assert header["license"] == "mit"  # the user's license survives a new rendering
    tasks = {r["task"]["type"] for r in header["model-index"][0]["results"]}
    assert tasks == {"image-text-retrieval", "zero-shot-image-classification"}
    provenance = json.loads((run / "provenance.json").read_text())  # as after a resumed run saved new weights
    provenance["student"]["fingerprint"] = "0" * 64
    (run / "provenance.json").write_text(json.dumps(provenance))
    header, body = front_matter(write_model_card(run))
    assert "model-index" not in header and "## Evaluation" not in body  # the results were of other weights


def test_old_run_folders_and_student_pt_paths_get_a_clear_answer(first_run, tmp_path):
    legacy = tmp_path / "legacy"  # what kd-train wrote before: student.pt and a bare model config
    legacy.mkdir()
    model = open_clip.create_model("kd-test-student")
    torch.save({"state_dict": model.state_dict()}, legacy / "student.pt")
    (legacy / "open_clip_config.json").write_text(json.dumps(open_clip.get_model_config("kd-test-student")))
    assert create_clip("kd-test-student", str(legacy / "student.pt")).fingerprint == weights_fingerprint(model)
    with pytest.raises(ModelError, match=r"written before run folders became open_clip hub folders.*student.pt"):
        create_clip(f"local-dir:{legacy}")
    with pytest.raises(ModelError, match=rf"open_clip hub folder .*give the model as local-dir:{first_run['run']}"):
        create_clip("kd-test-student", str(first_run["run"] / "student.pt"))
    save_file({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")  # safetensors of another model
    with pytest.raises(ModelError, match="does not fit this model"):
        create_clip("kd-test-student", str(tmp_path / "other.safetensors"))


def test_report_to_names_the_extra_of_a_missing_package(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown reporter 'mlflow'; choose from tensorboard, wandb"):
        parse_report_to("tensorboard,mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"the wandb package is not installed: pip install 'clip-kd-cache\[wandb\]'"):
        parse_report_to("wandb")
    assert parse_report_to(" tensorboard, tensorboard ") == ("tensorboard",)
