"""Model factory: every teacher and student is an open_clip model, named or described by a config JSON.

`--teacher` / `--student` take an open_clip model name (``ViT-B-16``, or one of the configs shipped in
``common/model_configs``: ``ViT-T-16`` from CLIP-KD and the small ``kd-*`` configs of the demo and tests) or a
path to an open_clip-style config JSON (registered with open_clip under the file's stem, so that
``open_clip.create_model_and_transforms(stem, pretrained=ckpt)`` works for our checkpoints too).

`--pretrained` takes an open_clip pretrained tag (downloads: needs network) or a local checkpoint file: a plain
state_dict or a dict with ``state_dict``, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import MultimodalTransformer
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """A model name, config file or checkpoint that cannot be used, with what to do about it."""


def resolve_model_name(name_or_config: str) -> str:
    """Register a config JSON with open_clip if given one; return the open_clip model name."""
    path = Path(name_or_config)
    if str(name_or_config).endswith(".json") or path.is_file():
        if not path.is_file():
            raise ModelError(f"model config {name_or_config!r} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"model config {path} is not valid JSON: {e}") from e
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
        if missing:
            raise ModelError(f"model config {path} lacks {sorted(missing)}: it must be an open_clip model config")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name_or_config) is None:
        raise ModelError(
            f"unknown model {name_or_config!r}: give an open_clip model name "
            f"(see open_clip.list_models()) or a path to a model config JSON")
    return name_or_config


def model_config(name: str) -> dict:
    return open_clip.get_model_config(resolve_model_name(name))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state_dict (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a local checkpoint (plain state_dict or {'state_dict': ...}) strictly, weights_only=True."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    not_a_checkpoint = ModelError(f"{path} is not a torch checkpoint of tensors (a state_dict or "
                                  f"{{'state_dict': ...}} written by torch.save): check the path")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (RuntimeError, AssertionError) as e:  # open_clip asserts on some shape mismatches
        if "PytorchStreamReader" in str(e):  # a damaged or foreign zip file
            raise not_a_checkpoint from e
        raise ModelError(
            f"checkpoint {path} does not fit this model ({type(model).__name__}): {str(e).splitlines()[0]} — "
            f"check --model/--teacher/--student names the architecture the checkpoint was trained as") from e
    except Exception as e:  # noqa: BLE001 - unpickling a foreign file fails in any way (KeyError, IndexError, ...)
        raise not_a_checkpoint from e


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip logs its progress (INFO) and a random-init warning on the root logger: drop those records while
    it builds a model (our own checkpoints are loaded right after), keeping every other logger's and its errors."""
    def keep(record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        return record.levelno > logging.WARNING or (
            record.levelno == logging.WARNING and "Model initialized randomly" not in record.getMessage())
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@dataclass
class LoadedCLIP:
    """An open_clip model with everything needed to feed it and to record where it came from."""
    name: str
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> tensor, open_clip's eval transform for this model
    tokenizer: Callable  # list[str] -> LongTensor
    config: dict
    pretrained: str | None
    fingerprint: str
    preprocess_cfg: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    def autocast(self):
        """fp16 autocast on GPU (as the cache is built), nothing on CPU."""
        device = next(self.model.parameters()).device
        return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings on the CPU, under inference mode (autocast on GPU)."""
        device = next(self.model.parameters()).device
        with torch.inference_mode(), self.autocast():
            return self.model.encode_image(images.to(device, non_blocking=True), normalize=True).float().cpu()

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.inference_mode(), self.autocast():
            return self.model.encode_text(tokens.to(device, non_blocking=True), normalize=True).float().cpu()

    def provenance(self) -> dict:
        return {
            "model": self.name,
            "config": self.config,
            "pretrained": self.pretrained,
            "fingerprint": self.fingerprint,
            "open_clip_version": open_clip.__version__,
            "preprocess": self.preprocess_cfg,
        }


def initialize_left_empty(model: torch.nn.Module) -> None:
    """Give a value to the parameters open_clip creates with `torch.empty` and never initializes.

    open_clip 3.3's CoCa text decoder (`MultimodalTransformer`) has `text_projection = torch.empty(...)`; its
    `init_parameters` is never called (and could not run: it reads `self.transformer`, open_clip issue #554). A
    random-init CoCa therefore projects to the vocabulary with whatever the allocator handed back: zeros in a fresh
    process, earlier tensors' values (NaN included) in a long-lived one. Use the init that method means to give.
    """
    for module in model.modules():
        if isinstance(module, MultimodalTransformer) and module.text_projection is not None:
            torch.nn.init.normal_(module.text_projection, std=module.width ** -0.5)


def _open_clip_model(name: str, pretrained: str | None) -> torch.nn.Module:
    """The fp32 model on the CPU: from an open_clip pretrained tag, or random init (seeded) + a local checkpoint."""
    if pretrained and not Path(pretrained).exists():
        # an open_clip tag: open_clip resolves (and may download) it
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise ModelError(
                f"could not load pretrained {pretrained!r} for {name}: {e}. Offline, pass a local checkpoint "
                f"file path to --pretrained instead of a tag") from e
    else:
        # a random-init model is reproducible (its fingerprint identifies it)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.create_model(name, device="cpu")
            initialize_left_empty(model)
        if pretrained:
            load_weights(model, pretrained)
    return model


def create_clip(name_or_config: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> LoadedCLIP:
    """Build an open_clip model (fp32) with its eval preprocessing and tokenizer, and fingerprint its weights."""
    name = resolve_model_name(name_or_config)
    with quiet_open_clip():
        model, tokenizer = _open_clip_model(name, pretrained), open_clip.get_tokenizer(name)
    model.to(device)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return LoadedCLIP(
        name=name,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        config=open_clip.get_model_config(name),
        pretrained=str(pretrained) if pretrained else None,
        fingerprint=weights_fingerprint(model),
        preprocess_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()},
    )


def named_weights(spec: str | None, default_name: str) -> dict[str, str]:
    """'--teacher-pretrained' values: 'PATH' (the default teacher's) or 'NAME=PATH,NAME=PATH' -> {name: path}."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        name, sep, path = item.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (default_name, item)
        if not path or name in out:
            raise ModelError(f"--teacher-pretrained {spec!r}: give PATH, or NAME=PATH entries separated by commas, "
                             f"each teacher once")
        out[name] = path
    return out


def clip_from_provenance(provenance: dict, pretrained: str | None = None, device: str = "cpu") -> LoadedCLIP:
    """Rebuild the exact teacher a cache was built with (its config is stored, so a config file need not exist),
    and check its weights' fingerprint. `pretrained` overrides a stored checkpoint path that moved."""
    name, config = provenance["model"], provenance["config"]
    if open_clip.get_model_config(name) != config:
        config_dir = Path(tempfile.mkdtemp(prefix="kd-teacher-config-"))
        path = config_dir / f"{name}.json"
        path.write_text(json.dumps(config))
        name = resolve_model_name(str(path))
    weights = pretrained or provenance.get("pretrained")
    if weights and not Path(weights).exists() and Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise ModelError(f"the teacher's weights {weights} (recorded in the cache) are not there: pass the "
                         f"checkpoint's new path with --teacher-pretrained")
    teacher = create_clip(name, weights, device=device)
    if teacher.fingerprint != provenance["fingerprint"]:
        raise ModelError(f"teacher weights {weights} have fingerprint {teacher.fingerprint[:12]}, the cache was "
                         f"built with {provenance['fingerprint'][:12]}: these are not the cache's teacher weights")
    return teacher
