"""`kd-eval`: retrieval / zero-shot / compare against direct open_clip computations, caches, and bad input.

Commands run in-process through click's CliRunner (a subprocess costs seconds of imports each); one test runs
the real `python -m evaluation.cli` process to check that user errors exit 1 without a traceback.
"""
from __future__ import annotations

import json
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import zarr
from click.testing import CliRunner

import common.models

from evaluation.retrieval import retrieval_metrics_bruteforce
from evaluation import compare as compare_module
from evaluation.compare import RETRIEVAL_TASK, ZEROSHOT_TASK, Comparison, Entry, Evaluated, markdown_table
from evaluation.cli import main
from evaluation.encode import EncodedSplit
from stage1_teacher.build import BuildOptions, build_cache
from tests.helpers import cli, save_random_checkpoint

STUDENT, TEACHER = "kd-test-student", "kd-test-teacher"
KS = (1, 5, 10)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_ckpts")
    return {STUDENT: save_random_checkpoint(STUDENT, root / "student.pt", seed=1),
            TEACHER: save_random_checkpoint(TEACHER, root / "teacher.pt", seed=2)}


@pytest.fixture(scope="module")
def val_cache(synth_corpus, ckpts, tmp_path_factory) -> Path:
    """A teacher cache of the val split, with one stored view beside the clean one."""
    out = tmp_path_factory.mktemp("eval_cache") / "val.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpts[TEACHER]), data=str(synth_corpus / "val"),
                             out=str(out), views=1, batch_size=16, grad_batch=16, chunk_rows=32, workers=0))
    return out


def kd_eval(*args, code: int = 0):
    """Run `kd-eval args` in-process; check the exit code (user errors exit 1 via click, never by a crash)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), "crashed instead of a click error"
    return result


def direct(model_name: str, ckpt: Path, split: Path, first_caption: bool = False) -> dict:
    """Embeddings straight from open_clip and webdataset: images, every caption line, labels."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(ckpt))
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    samples = list(wds.WebDataset([str(p) for p in sorted(split.glob("*.tar"))], shardshuffle=False).decode("pil"))
    captions = [[line for line in s["txt"].splitlines() if line.strip()] for s in samples]
    captions = [c[:1] for c in captions] if first_caption else captions
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(s["jpg"].convert("RGB")) for s in samples]),
                                    normalize=True)
        texts = model.encode_text(tokenizer([c for cs in captions for c in cs]), normalize=True)
    return {"image": images.numpy(), "text": texts.numpy(), "model": model, "tokenizer": tokenizer,
            "text_to_image": np.repeat(np.arange(len(samples)), [len(c) for c in captions]),
            "labels": np.array([s["json"].get("label", -1) for s in samples])}


@pytest.fixture(scope="module")
def student_val(synth_corpus, ckpts) -> dict:
    return direct(STUDENT, ckpts[STUDENT], synth_corpus / "val")


def test_retrieval_matches_direct_open_clip_bruteforce(synth_corpus, ckpts, student_val, tmp_path):
    out = tmp_path / "r.json"
    result = kd_eval("retrieval", "--model", STUDENT, "--checkpoint", ckpts[STUDENT], "--data", synth_corpus / "val",
                     "--workers", 0, "--batch-size", 16, "--output", out)
    n_images, n_captions = len(student_val["image"]), len(student_val["text"])
    assert n_captions > n_images  # val samples carry 3-5 caption lines: all of them are queries / positives
    assert f"{n_images} images, {n_captions} captions" in result.output
    report = json.loads(out.read_text())
    assert set(report) == {"dataset", "model", "pretrained", "task", "metrics"}
    assert (report["model"], report["pretrained"], report["task"]) == (STUDENT, str(ckpts[STUDENT]),
                                                                       "zeroshot_retrieval")
    assert set(report["metrics"]) == {f"{name}@{k}" for k in KS for name in (
        "text_retrieval_recall", "image_retrieval_recall", "i2t_R", "t2i_R")}
    expected = retrieval_metrics_bruteforce(student_val["image"], student_val["text"], student_val["text_to_image"])
    assert report["metrics"] == pytest.approx(expected, abs=1e-12)
    assert "text_retrieval_recall@1" in result.output  # the stdout table: each metric once, in percent
    printed = [line.split()[0] for line in result.output.splitlines() if "_R@" in line or "recall@" in line]
    assert sorted(printed) == sorted(f"{way}_retrieval_recall@{k}" for way in ("text", "image") for k in KS)
    assert f"{100 * expected['text_retrieval_recall@1']:.1f}" in result.output


def test_cache_metrics_equal_teacher_first_captions(synth_corpus, ckpts, val_cache, tmp_path):
    from_cache, from_model = tmp_path / "cache.json", tmp_path / "model.json"
    result = kd_eval("retrieval", "--cache", val_cache, "--data", synth_corpus / "val", "--output", from_cache)
    assert "48 images, 48 captions, 0 invalid samples dropped" in result.output
    kd_eval("retrieval", "--model", TEACHER, "--checkpoint", ckpts[TEACHER], "--data", synth_corpus / "val",
            "--first-caption", "--workers", 0, "--output", from_model)
    cached, live = json.loads(from_cache.read_text()), json.loads(from_model.read_text())
    assert (cached["model"], cached["pretrained"]) == (TEACHER, str(ckpts[TEACHER]))  # the cache's teacher
    assert cached["metrics"].keys() == live["metrics"].keys()
    for name, value in live["metrics"].items():  # fp16 storage may move one of the 48 queries across a cut-off
        assert abs(cached["metrics"][name] - value) <= 1 / 48 + 1e-9, name


def test_cache_refused_for_other_data_or_without_text(synth_corpus, val_cache, tmp_path):
    result = kd_eval("retrieval", "--cache", val_cache, "--data", synth_corpus / "train", code=1)
    # the usual slip (val and train both hold a 00000.tar): the message names the data the store was built from
    assert "00000.tar is not the 00000.tar the cache holds" in result.output
    assert (f"was built from 2 shard(s), --data '{synth_corpus / 'val'}/{{00000..00001}}.tar': give those (or "
            f"some of them) as --data") in result.output
    no_text = tmp_path / "no_text.zarr"
    shutil.copytree(val_cache, no_text)
    del zarr.open_group(str(no_text), mode="r+")["text_emb"]
    result = kd_eval("retrieval", "--cache", no_text, "--data", synth_corpus / "val", code=1)
    assert "text_emb" in result.output and "Traceback" not in result.output


def test_zeroshot_matches_direct_computation(synth_corpus, ckpts, tmp_path):
    split = synth_corpus / "zeroshot"
    out = tmp_path / "z.json"
    kd_eval("zeroshot", "--model", STUDENT, "--checkpoint", ckpts[STUDENT], "--data", split,
            "--classnames", split / "classnames.txt", "--workers", 0, "--output", out)  # templates.txt found beside
    metrics = json.loads(out.read_text())["metrics"]
    ref = direct(STUDENT, ckpts[STUDENT], split)
    classnames = (split / "classnames.txt").read_text().splitlines()
    templates = (split / "templates.txt").read_text().splitlines()
    with torch.no_grad():
        prompts = [ref["model"].encode_text(ref["tokenizer"]([t.format(c) for t in templates]), normalize=True)
                   for c in classnames]
    weights = torch.nn.functional.normalize(torch.stack([p.mean(0) for p in prompts]), dim=-1).numpy()
    logits, labels = ref["image"] @ weights.T, ref["labels"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1_hit = top5[:, 0] == labels
    expected = {"acc1": top1_hit.mean(), "acc5": (top5 == labels[:, None]).any(1).mean(),
                "mean_per_class_recall": np.mean([top1_hit[labels == c].mean() for c in np.unique(labels)])}
    assert metrics == pytest.approx(expected, abs=1e-6)  # the metrics are float32 means
    assert all(0 <= v <= 1 for v in metrics.values())


def test_pair_margin_is_own_minus_mean_other_caption_cosine():
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    images, texts = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(9, 8)))
    text_to_image = np.array([0, 0, 1, 2, 2, 2, 3, 3, 1])  # image 4 has no caption: no margin
    split = EncodedSplit(images, texts, text_to_image, np.array([f"{i}" for i in range(5)]), None)
    cos = images @ texts.T
    expected = [cos[i, text_to_image == i].mean() - cos[i, text_to_image != i].mean() for i in range(4)]
    assert split.pair_margin() == pytest.approx(expected, abs=1e-6)


def test_compare_table_figure_alignment(synth_corpus, ckpts, student_val, tmp_path, monkeypatch):
    encodings, encode_split = [], compare_module.encode_split

    def counting(clip, corpus, *args, **kwargs):
        encodings.append(corpus.spec)
        return encode_split(clip, corpus, *args, **kwargs)

    monkeypatch.setattr(compare_module, "encode_split", counting)
    md, png, out = tmp_path / "results.md", tmp_path / "fig.png", tmp_path / "cmp.json"
    zeroshot = synth_corpus / "zeroshot"
    kd_eval("compare", "--data", synth_corpus / "val", "--entry", f"teacher={TEACHER}:{ckpts[TEACHER]}",
            "--entry", f"student={STUDENT}:{ckpts[STUDENT]}", "--zeroshot-data", zeroshot,
            "--classnames", zeroshot / "classnames.txt", "--workers", 0, "--baseline-entry", "student",
            "--markdown", md, "--figure", png, "--output", out)
    assert len(encodings) == 4  # each model once per split
    table = md.read_text()
    for column in ("| teacher |", "| student |", "i2t_R@1", "t2i_R@10", "acc1", "image_cka", "text_cosine",
                   "vs baseline |"):
        assert column in table
    assert table.splitlines()[3].endswith(" | +0.0 |")  # the baseline against itself
    png_bytes = png.read_bytes()
    assert png_bytes[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert struct.unpack(">II", png_bytes[16:24]) == (1300, 450)  # recall, zero-shot accuracy, similarity panels
    report = json.loads(out.read_text())
    assert report["alignment"]["teacher"] == pytest.approx(
        {"image_cosine": 1.0, "text_cosine": 1.0, "image_cka": 1.0, "text_cka": 1.0})
    student = report["alignment"]["student"]
    assert student["image_cosine"] is None and student["text_cosine"] is None  # widths 32 vs 48
    assert 0 < student["image_cka"] < 1 and 0 < student["text_cka"] < 1
    retrieval = next(r for r in report["results"] if r["model"] == "student" and r["task"] == "zeroshot_retrieval")
    assert retrieval["metrics"] == pytest.approx(retrieval_metrics_bruteforce(
        student_val["image"], student_val["text"], student_val["text_to_image"]), abs=1e-12)
    assert {r["task"] for r in report["results"]} == {"zeroshot_retrieval", "zeroshot_classification"}


@pytest.fixture(scope="module")
def deeper_student_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of another architecture with the same widths: kd-test-student with a third text layer."""
    root = tmp_path_factory.mktemp("deeper")
    config = json.loads((Path(common.models.CONFIG_DIR) / f"{STUDENT}.json").read_text())
    config["text_cfg"]["layers"] = 3
    (root / "kd-test-student-deeper.json").write_text(json.dumps(config))
    name = common.models.resolve_model_name(str(root / "kd-test-student-deeper.json"))
    return save_random_checkpoint(name, root / "deeper.pt", seed=3)


def test_checkpoint_of_another_architecture_is_a_clear_error_in_a_real_process(synth_corpus, deeper_student_ckpt):
    result = cli("evaluation.cli", "retrieval", "--model", STUDENT, "--checkpoint", deeper_student_ckpt,
                 "--data", synth_corpus / "val", "--workers", 0, check=False)
    assert result.returncode == 1
    assert f"checkpoint {deeper_student_ckpt} does not fit" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_of_another_width_is_a_clear_error(synth_corpus, ckpts):
    """The usual mistake: the teacher's checkpoint given for the student model."""
    result = kd_eval("retrieval", "--model", STUDENT, "--checkpoint", ckpts[TEACHER], "--data", synth_corpus / "val",
                     "--workers", 0, code=1)
    assert f"checkpoint {ckpts[TEACHER]} does not fit" in result.output


def empty_split(root: Path) -> Path:
    with tarfile.open(root / "00000.tar", "w"):
        pass
    return root


@pytest.mark.parametrize("make_data, message", [
    (lambda corpus, tmp: corpus / "val", "need at least k=100"),  # with --k 1,100: more than the 48 images
    (lambda corpus, tmp: tmp / "missing/{00000..00003}.tar", "does not exist"),
    (lambda corpus, tmp: tmp, "holds no .tar shard"),
    (lambda corpus, tmp: empty_split(tmp), "hold no sample"),
])
def test_bad_retrieval_input_is_a_click_error(synth_corpus, ckpts, tmp_path, make_data, message):
    result = kd_eval("retrieval", "--model", STUDENT, "--checkpoint", ckpts[STUDENT], "--k", "1,100",
                     "--data", make_data(synth_corpus, tmp_path), "--workers", 0, code=1)
    assert message in result.output


def test_zeroshot_without_labels_names_the_sample(synth_corpus, ckpts):
    zeroshot = synth_corpus / "zeroshot"
    result = kd_eval("zeroshot", "--model", STUDENT, "--checkpoint", ckpts[STUDENT], "--data", synth_corpus / "val",
                     "--classnames", zeroshot / "classnames.txt", "--workers", 0, code=1)
    assert "sample 000000192 has no integer 'label'" in result.output  # the first val key


def comparison_of(scores: dict[str, tuple[float, float, float, float]], baseline: str | None) -> Comparison:
    """A comparison of entries with given (i2t_R@1, t2i_R@1, acc1, acc5), without running models."""
    evaluated = []
    for name, (i2t, t2i, acc1, acc5) in scores.items():
        e = Evaluated(Entry(name, STUDENT), split=None)
        e.results = {RETRIEVAL_TASK: {"metrics": {"i2t_R@1": i2t, "t2i_R@1": t2i}},
                     ZEROSHOT_TASK: {"metrics": {"acc1": acc1, "acc5": acc5}}}
        e.alignment = {"image_cosine": None, "text_cosine": None, "image_cka": 0.5, "text_cka": 0.25}
        evaluated.append(e)
    return Comparison("val", "teacher", (1,), evaluated, baseline)


def test_markdown_table_in_percent_with_vs_baseline_and_a_verdict():
    table = markdown_table(comparison_of({"teacher": (0.8, 0.7, 0.4, 0.9), "baseline": (0.1, 0.1, 0.06, 0.2),
                                          "distilled": (0.2, 0.15, 0.06, 0.25)}, baseline="baseline"))
    lines = table.splitlines()
    assert lines[0] == "| model | i2t_R@1 | t2i_R@1 | acc1 | acc5 | image_cosine | text_cosine | image_cka | " \
                       "text_cka | vs baseline |"
    assert lines[4] == "| distilled | 20.0 | 15.0 | 6.0 | 25.0 | n/a | n/a | 50.0 | 25.0 | +5.0 |"
    assert lines[3].endswith("| +0.0 |") and lines[2].endswith("| +58.5 |")
    assert lines[-1] == "Verdict: `distilled` beats `baseline` by 5.0 points (mean of i2t_R@1, t2i_R@1, acc1, acc5)."
    tie = markdown_table(comparison_of({"teacher": (0.8, 0.7, 0.4, 0.9), "baseline": (0.1, 0.1, 0.06, 0.2),
                                        "same": (0.1, 0.1, 0.06, 0.2), "worse": (0.1, 0.1, 0.02, 0.2)}, "baseline"))
    assert tie.splitlines()[-1].startswith("Verdict: `same` ties `baseline`; `worse` trails `baseline` by 1.0 points")
    without = markdown_table(comparison_of({"teacher": (0.8, 0.7, 0.4, 0.9)}, baseline=None))
    assert "vs baseline" not in without and "Verdict" not in without
