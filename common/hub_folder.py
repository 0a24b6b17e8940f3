"""A model as an open_clip hub folder: what `open_clip.push_to_hf_hub` uploads, written locally.

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}  (open_clip's own `save_config_for_hf`)
    open_clip_model.safetensors  the state_dict (safetensors: loading runs no code)
    tokenizer files              where the tokenizer is a Hugging Face one (`save_pretrained`)

so that plain open_clip loads it with `create_model_and_transforms("local-dir:FOLDER")` and
`get_tokenizer("local-dir:FOLDER")`, and `hf upload ORG/REPO FOLDER` publishes it. Every file is
written to a temporary name and renamed: a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from common.storage import atomic_write

# what a save_pretrained of open_clip's tokenizers (HFTokenizer, SigLipTokenizer) can write
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja")
CONFIG_FILE, WEIGHTS_FILE = HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
HUB_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """The state_dict as safetensors (tensors that share storage, such as tied weights, are stored apart)."""
    from safetensors.torch import save_file
    tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in state_dict.items()}
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a model folder is for others to read
    atomic_write(path, write)


def save_config(model: torch.nn.Module, model_config: dict, folder: Path) -> None:
    """open_clip_config.json, by open_clip's own writer (its preprocess_cfg: mean, std, interpolation, resize)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    atomic_write(folder / CONFIG_FILE, lambda tmp: save_config_for_hf(model, tmp, model_config=model_config))


def save_tokenizer(tokenizer, folder: Path) -> None:
    """A Hugging Face tokenizer's files (open_clip reads them from a local-dir: folder whose config names an
    hf_tokenizer_name); open_clip's own CLIP tokenizer needs none."""
    if not hasattr(tokenizer, "save_pretrained"):
        return
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for written in Path(tmp).iterdir():
            os.replace(written, folder / written.name)


def is_hub_folder(folder: Path) -> bool:
    """Whether `folder` holds an open_clip_config.json of the hub layout (with model_cfg)."""
    try:
        return "model_cfg" in json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
