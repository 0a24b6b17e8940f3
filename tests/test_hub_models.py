"""Hub models and pretrained tags as open_clip means them, offline: `hf-hub:` names read from a Hugging Face cache
filled the way a finished download leaves it (HF_HUB_OFFLINE=1), `local-dir:` folders, a Hugging Face text tower
and tokenizer (a tiny tokenizer made with `tokenizers`), and a QuickGELU pretrained tag (`ViT-B-16` + `openai`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file

from common.corpus import Corpus
from common.synth import make_sample, write_shard
from evaluation.compare import Entry
from common.models import ModelError, create_clip, effective_config, tag_wants_quick_gelu, weights_fingerprint
from tests.helpers import REPO, cli, fill_hf_cache, offline_hub_env, save_tiny_hf_tokenizer

HUB_MODEL, HF_TEXT = "kd-test/tiny-sigmoid-hf", "kd-test/tiny-bert"
MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP's: only the hub folder's preprocess_cfg says so


def hub_model_config(text_model: str) -> dict:
    """A SigLIP-style model (timm ViT, logit bias) with a Hugging Face BERT text tower."""
    return {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"hf_model_name": text_model, "hf_tokenizer_name": text_model, "hf_proj_type": "linear",
                         "hf_pooler_type": "mean_pooler", "context_length": 16}}


@pytest.fixture(scope="module")
def hub(synth_corpus, tmp_path_factory) -> dict:
    """The HF cache (two repos: the open_clip model, its BERT text config + tokenizer) and a local-dir: copy."""
    from transformers import BertConfig
    root = tmp_path_factory.mktemp("hub")
    bert = root / "bert"
    words = {w for s in Corpus.open(str(synth_corpus / "train")).read(0, 64) for w in s.caption.lower().split()}
    save_tiny_hf_tokenizer(bert, sorted(words), max_length=16)
    BertConfig(vocab_size=len(words) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=16).save_pretrained(bert)
    torch.manual_seed(3)  # the weights: built against the local BERT folder, keys are those of the hub model
    config = hub_model_config(str(bert))
    config.pop("custom_text")
    config["text_cfg"]["hf_model_pretrained"] = False  # a random init: the BERT folder holds a config only
    model = open_clip.CustomTextCLIP(**config)
    save_file(model.state_dict(), root / "open_clip_model.safetensors")
    (root / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": hub_model_config(HF_TEXT),
        "preprocess_cfg": {"mean": MEAN_STD, "std": MEAN_STD, "interpolation": "bilinear", "resize_mode": "squash"}}))
    hf_home = root / "hf"
    fill_hf_cache(hf_home, HF_TEXT, {p.name: p for p in bert.iterdir()})
    snapshot = fill_hf_cache(hf_home, HUB_MODEL, {n: root / n for n in ("open_clip_config.json",
                                                                         "open_clip_model.safetensors")})
    local = root / "local-copy"  # a self-contained local-dir: folder: the BERT config and tokenizer beside
    shutil.copytree(snapshot, local, symlinks=False)
    for p in bert.iterdir():
        shutil.copy(p, local / p.name)
    config = json.loads((local / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"] |= {"hf_model_name": str(local), "hf_tokenizer_name": str(local)}
    (local / "open_clip_config.json").write_text(json.dumps(config))
    return {"env": offline_hub_env(hf_home), "local": local, "root": root}


# a plain open_clip process (nothing of this package): the hub model's own embeddings of the first samples
PLAIN_EMBED = """
import json, sys
import open_clip, torch, webdataset as wds
from PIL import Image
import io
name, shard, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms(name)
tokenizer = open_clip.get_tokenizer(name)
samples = [s for _, s in zip(range(4), wds.WebDataset(shard, shardshuffle=False))]
images = torch.stack([preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
texts = tokenizer([s["txt"].decode().splitlines()[0] for s in samples])
with torch.no_grad():
    torch.save({"image": model.eval().encode_image(images, normalize=True),
                "text": model.encode_text(texts, normalize=True), "bias": model.logit_bias.item(),
                "mean": list(model.visual.preprocess_cfg["mean"])}, out)
"""


def plain_embeddings(name: str, shard: Path, env: dict, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PLAIN_EMBED, name, str(shard), str(out)], cwd=out.parent,
                            capture_output=True, text=True, env={**__import__("os").environ, **env})
    assert result.returncode == 0, result.stderr
    return torch.load(out, weights_only=True)


def test_hf_hub_teacher_builds_with_its_own_preprocessing_tokenizer_and_bias(synth_corpus, hub, tmp_path):
    store = tmp_path / "hub.zarr"
    cli("stage1_teacher.cli", "build", "--teacher", f"hf-hub:{HUB_MODEL}", "--data", synth_corpus / "train",
        "--out", store, "--batch-size", 32, "--grad-batch", 32, "--chunk-rows", 64, "--workers", 0, env=hub["env"])
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["teacher"]["model"] == f"hf-hub:{HUB_MODEL}" and attrs["teacher"]["preprocess"]["mean"] == MEAN_STD
    reference = plain_embeddings(f"hf-hub:{HUB_MODEL}", sorted((synth_corpus / "train").glob("*.tar"))[0],
                                 hub["env"], tmp_path / "plain.pt")
    assert attrs["teacher_logit_bias"] == pytest.approx(reference["bias"]) and reference["mean"] == MEAN_STD
    group = zarr.open_group(str(store), mode="r")
    for name in ("image", "text"):
        stored = torch.from_numpy(group[f"{name}_emb"][:4].astype(np.float32))
        assert torch.nn.functional.cosine_similarity(stored, reference[name]).min() > 0.999, name
    # the teacher's HF text tower serves hidden states live (dlip), and the store its cached targets
    cli("stage2_student.cli", "--data", synth_corpus / "train", "--cache", store, "--student", "kd-test-student",
        "--out", tmp_path / "run", "--losses", "task,fd,gd,dlip", "--batch-size", 16, "--steps", 1, "--warmup", 1,
        "--workers", 0, env=hub["env"])
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["live_batches"] == 1 and np.isfinite(metrics["dlip"])
    cli("stage1_teacher.cli", "verify", store, "--data", synth_corpus / "train", env=hub["env"])


def test_local_dir_models_are_recorded_absolute_and_train_as_students(synth_corpus, hub, tmp_path):
    relative = Path(__import__("os").path.relpath(hub["local"], REPO))
    store = tmp_path / "local.zarr"
    cli("stage1_teacher.cli", "build", "--teacher", f"local-dir:{relative}", "--data", synth_corpus / "train",
        "--out", store, "--batch-size", 32, "--grad-batch", 32, "--chunk-rows", 64, "--workers", 0,
        env={"HF_HUB_OFFLINE": "1"})
    assert zarr.open_group(str(store), mode="r").attrs["teacher"]["model"] == f"local-dir:{hub['local']}"
    # the hub folder as student: its own weights, preprocessing and HF tokenizer; its sigmoid task loss
    cli("stage2_student.cli", "--data", synth_corpus / "train", "--cache", store, "--student",
        f"local-dir:{hub['local']}", "--out", tmp_path / "run", "--losses", "task,fd,crd", "--batch-size", 16,
        "--steps", 1, "--warmup", 1, "--workers", 0, env={"HF_HUB_OFFLINE": "1"})
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["fd"])
    result = cli("evaluation.cli", "retrieval", "--model", f"local-dir:{hub['local']}", "--data",
                 synth_corpus / "val", "--workers", 0, env={"HF_HUB_OFFLINE": "1"})
    assert "image_retrieval_recall@1" in result.stdout


def test_pretrained_tags_say_which_activation_open_clip_means():
    """From open_clip's own pretrained registry: OpenAI's weights were trained with QuickGELU."""
    assert tag_wants_quick_gelu("ViT-B-16", "openai") and tag_wants_quick_gelu("RN50", "openai")
    assert effective_config("ViT-B-16", "openai")["quick_gelu"] is True
    assert not tag_wants_quick_gelu("ViT-B-16-quickgelu", "openai")  # already QuickGELU
    assert not tag_wants_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")  # trained with GELU
    assert "quick_gelu" not in effective_config("ViT-B-16", None)


def test_vit_b_16_openai_builds_the_quickgelu_model(tmp_path):
    """The mission's command, offline: the tag's weights in the HF cache where open_clip looks for them. The store
    records quick_gelu and holds the QuickGELU model's embeddings (a GELU model with the same weights differs);
    verify rebuilds the same model from the provenance."""
    tag = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    torch.manual_seed(0)
    quick = open_clip.create_model("ViT-B-16-quickgelu")
    weights = quick.state_dict()
    hf_home = tmp_path / "hf"
    save_file(weights, tmp_path / "open_clip_model.safetensors")
    fill_hf_cache(hf_home, tag["hf_hub"].strip("/"), {"open_clip_model.safetensors":
                                                     tmp_path / "open_clip_model.safetensors"})
    # one batch of 8 val samples: a ViT-B-16 forward costs about a second a sample on CPU
    data = write_shard(tmp_path / "val8" / "00000.tar", [make_sample(0, "val", i, f"{i:09d}", image_size=32)
                                                         for i in range(8)])
    store = tmp_path / "openai.zarr"
    cli("stage1_teacher.cli", "build", "--teacher", "ViT-B-16", "--pretrained", "openai", "--data", data, "--out",
        store, "--batch-size", 8, "--grad-batch", 8, "--chunk-rows", 8, "--workers", 0, "--no-grads", "--dtype", "fp32",
        env=offline_hub_env(hf_home))
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["teacher"]["config"]["quick_gelu"] is True
    stored = torch.from_numpy(group["image_emb"][:4].astype(np.float32))
    samples = list(Corpus.open(str(data)).read(0, 4))
    embeddings = {}
    for name in ("ViT-B-16-quickgelu", "ViT-B-16"):
        model = quick if name == "ViT-B-16-quickgelu" else open_clip.create_model(name)
        model.load_state_dict(weights)
        preprocess = image_transform_v2(PreprocessCfg(**{k: tag[k] for k in ("mean", "std", "interpolation",
                                                                             "resize_mode")}), is_train=False)
        with torch.no_grad():
            embeddings[name] = model.eval().encode_image(torch.stack([preprocess(s.image) for s in samples]),
                                                         normalize=True)
    gap = lambda a, b: float((a - b).abs().max())  # noqa: E731  (fp32 store: no rounding between them)
    assert gap(stored, embeddings["ViT-B-16-quickgelu"]) < 1e-5 < 1e-4 < gap(stored, embeddings["ViT-B-16"])
    cli("stage1_teacher.cli", "verify", store, "--data", data, "--sample", 4, env=offline_hub_env(hf_home))


def test_init_from_a_local_dir_model_of_the_same_architecture(tmp_path):
    """--init / --pretrained local-dir:PATH loads that hub folder's weights (strictly), recorded absolute."""
    torch.manual_seed(1)
    model = open_clip.create_model("kd-test-student")
    folder = tmp_path / "hub-student"
    folder.mkdir()
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config("kd-test-student"), "preprocess_cfg": {}}))
    clip = create_clip("kd-test-student", f"local-dir:{folder}")
    assert clip.fingerprint == weights_fingerprint(model) and clip.pretrained == f"local-dir:{folder.resolve()}"
    with pytest.raises(ModelError, match=rf"the weights of local-dir:{folder} do not fit kd-test-teacher"):
        create_clip("kd-test-teacher", f"local-dir:{folder}")


def test_compare_entries_keep_a_hub_models_schema():
    assert Entry.parse("t=hf-hub:org/repo") == Entry("t", "hf-hub:org/repo", None)
    assert Entry.parse("s=local-dir:/runs/x") == Entry("s", "local-dir:/runs/x", None)
    assert Entry.parse("b=kd-test-student") == Entry("b", "kd-test-student", None)
