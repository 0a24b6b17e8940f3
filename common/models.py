"""Model factory: every teacher and student is an open_clip model, named or described by a config JSON.

`--teacher` / `--student` take an open_clip model name (``ViT-B-16``, or one of the configs shipped in
``common/model_configs``: ``ViT-T-16`` from CLIP-KD and the small ``kd-*`` configs of the demo and tests) or a
path to an open_clip-style config JSON (registered with open_clip under the file's stem, so that
``open_clip.create_model_and_transforms(stem, pretrained=ckpt)`` works for our checkpoints too).

A hub model, ``hf-hub:org/repo`` or ``local-dir:/path`` (open_clip's layout: ``open_clip_config.json`` with
``model_cfg`` and ``preprocess_cfg``, weights, tokenizer files), brings its config, weights, preprocessing and
tokenizer, as open_clip loads it (``hf-hub:`` reads the Hugging Face cache, so it works offline once downloaded).
A ``local-dir:`` path is recorded absolute, so another process resolves it.

`--pretrained` (`--init`) takes an open_clip pretrained tag (downloads: needs network), a local checkpoint file (a
plain state_dict or a dict with ``state_dict``, loaded with ``weights_only=True``), or a hub model of the same
architecture whose weights are loaded. A tag whose pretrained config says
``quick_gelu`` (OpenAI's weights) builds the QuickGELU model, as ``ViT-B-16-quickgelu`` would, and the recorded
config says so: open_clip itself would only warn and load QuickGELU weights into a GELU model.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2
import torch

from common.defaults import is_hub_model
from common.families import ModelInfo, describe, initialize_left_empty
from common.hub_folder import CONFIG_FILE, WEIGHTS_FILE, is_hub_folder

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """A model name, config file or checkpoint that cannot be used, with what to do about it."""


LEGACY_RUN_WEIGHTS = "student.pt"  # a kd-train run's weights before run folders were hub folders


def _resolve_hub_model(name: str) -> str:
    """'local-dir:PATH' with PATH made absolute, or 'hf-hub:ID'; checked to hold an open_clip model config."""
    schema, _, where = name.partition(":")
    if schema == "local-dir":
        path = Path(where).expanduser().resolve()
        config = path / CONFIG_FILE
        if not config.is_file():
            raise ModelError(f"{name}: {config} does not exist; a local-dir: model is a folder in open_clip's hub "
                             f"layout (open_clip_config.json with model_cfg and preprocess_cfg, and its weights)")
        if (path / LEGACY_RUN_WEIGHTS).is_file() and not is_hub_folder(path):
            raise ModelError(f"{name}: a kd-train run written before run folders became open_clip hub folders "
                             f"(student.pt and a bare model config): give the student's model name as the model "
                             f"and {path / LEGACY_RUN_WEIGHTS} as its checkpoint (--checkpoint / --pretrained / "
                             f"--init)")
        name = f"local-dir:{path}"
    try:
        config = open_clip.get_model_config(name)
    except Exception as e:  # noqa: BLE001 - hub look-ups fail in many ways (offline, missing repo, bad JSON)
        raise ModelError(f"{name}: cannot read its open_clip_config.json ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); offline, download it first or give a "
                         f"local-dir: path") from e
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ModelError(f"{name}: its open_clip_config.json has no open_clip model_cfg")
    return name


def resolve_model_name(name_or_config: str) -> str:
    """Register a config JSON with open_clip if given one; return the open_clip model name (hub names checked,
    local-dir: paths made absolute)."""
    if is_hub_model(name_or_config):
        return _resolve_hub_model(str(name_or_config))
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


def looks_like_a_file(pretrained: str) -> bool:
    """A --pretrained value that names a file (a path, or a checkpoint's suffix), not an open_clip tag."""
    return "/" in str(pretrained) or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")


def tag_wants_quick_gelu(name: str, pretrained: str | None) -> bool:
    """A pretrained tag trained with QuickGELU (OpenAI's) on a config without it: build it with QuickGELU."""
    if not pretrained or is_hub_model(name) or Path(pretrained).exists():
        return False
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    return bool(tag.get("quick_gelu")) and not open_clip.get_model_config(name).get("quick_gelu", False)


def effective_config(name: str, pretrained: str | None) -> dict:
    """The model config open_clip builds for (name, pretrained): the registered one, QuickGELU as the tag says."""
    config = open_clip.get_model_config(name)
    return config | {"quick_gelu": True} if tag_wants_quick_gelu(name, pretrained) else config


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
    if path.is_dir() or (not path.exists() and is_hub_folder(path.parent)):
        folder = path if path.is_dir() else path.parent
        raise ModelError(f"checkpoint {path} {'is a folder' if path.is_dir() else 'does not exist'}: {folder} is an "
                         f"open_clip hub folder (kd-train runs are, since their student.pt became "
                         f"{WEIGHTS_FILE}): give the model as local-dir:{folder}, without a checkpoint")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    not_a_checkpoint = ModelError(f"{path} is not a checkpoint of tensors (safetensors, or a state_dict or "
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

    @property
    def logit_bias(self) -> float | None:
        """A sigmoid-loss (SigLIP) model's learned bias b in s I Tᵀ + b; None for a softmax CLIP."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().item())

    @functools.cached_property
    def info(self) -> ModelInfo:
        """Its towers as measured (`common.families.describe`)."""
        return describe(self.model)

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


def _open_clip_model(name: str, pretrained: str | None, **overrides) -> torch.nn.Module:
    """The fp32 model on the CPU: from an open_clip pretrained tag, from a hub model's own weights, or random init
    (seeded) + a local checkpoint. `overrides`: open_clip.create_model's force_* arguments."""
    if is_hub_model(name) and not pretrained:
        with torch.random.fork_rng():  # a hub folder without weights is a reproducible random init
            torch.manual_seed(0)
            try:
                model = open_clip.create_model(name, device="cpu", weights_only=True, pretrained_text=False,
                                               **overrides)
            except Exception as e:  # noqa: BLE001 - re-raised with what to do
                raise ModelError(f"could not load {name}: {type(e).__name__}: {e}") from e
            initialize_left_empty(model)
    elif pretrained and is_hub_model(pretrained):
        # the weights of a hub model of the same architecture (kd-train --init local-dir:...)
        model = _open_clip_model(name, None, **overrides)
        source = _open_clip_model(_resolve_hub_model(pretrained), None)
        try:
            model.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise ModelError(f"the weights of {pretrained} do not fit {name}: {str(e).splitlines()[0]} — give the "
                             f"hub model itself as the model, or a checkpoint of {name}") from e
    elif pretrained and not Path(pretrained).exists() and not looks_like_a_file(pretrained):
        # an open_clip tag: open_clip resolves (and may download) it
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu", weights_only=True,
                                           force_quick_gelu=tag_wants_quick_gelu(name, pretrained), **overrides)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise ModelError(
                f"could not load pretrained {pretrained!r} for {name}: {e}. Offline, pass a local checkpoint "
                f"file path to --pretrained instead of a tag") from e
    else:
        # a random-init model is reproducible (its fingerprint identifies it)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.create_model(name, device="cpu", load_weights=False, pretrained_text=False,
                                           **overrides)
            initialize_left_empty(model)
        if pretrained:
            load_weights(model, pretrained)
    return model


def _tokenizer(name: str) -> Callable:
    """open_clip's tokenizer for the model (a hub model's own, a Hugging Face one where its config names one)."""
    try:
        return open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - tokenizers fail in many ways offline (missing files, no network)
        raise ModelError(f"could not load the tokenizer of {name}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                         f"Offline, a Hugging Face tokenizer must be in the Hugging Face cache (HF_HOME) or in the "
                         f"local-dir: folder") from e


def create_clip(name_or_config: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                **overrides) -> LoadedCLIP:
    """Build an open_clip model (fp32) with its eval preprocessing and tokenizer, and fingerprint its weights.
    `overrides`: open_clip.create_model's force_* arguments, as open_clip_train passes its --force-patch-dropout and
    --image-* options (force_patch_dropout, force_preprocess_cfg); `config` stays the model's own."""
    name = resolve_model_name(name_or_config)
    if pretrained and is_hub_model(pretrained):
        pretrained = _resolve_hub_model(pretrained)  # recorded as another process resolves it
    with quiet_open_clip():
        model, tokenizer = _open_clip_model(name, pretrained, **overrides), _tokenizer(name)
    model.to(device).eval()  # inference mode (BatchNorm running stats, no dropout); a trainer sets train()
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return LoadedCLIP(
        name=name,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        config=effective_config(name, pretrained),
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
    weights = pretrained or provenance.get("pretrained")
    try:
        registered = effective_config(name, weights) if is_hub_model(name) or open_clip.get_model_config(name) \
            else None
    except Exception as e:  # noqa: BLE001 - a hub folder that moved, a hub id not in the cache
        raise ModelError(f"the teacher {name} (recorded in the cache) cannot be read here: {e}; make it "
                         f"available at that place (download it, or restore the folder)") from e
    if registered != config:
        config_dir = Path(tempfile.mkdtemp(prefix="kd-teacher-config-"))
        path = config_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
        path.write_text(json.dumps(config))
        name = resolve_model_name(str(path))
    if weights and not Path(weights).exists() and looks_like_a_file(weights):
        raise ModelError(f"the teacher's weights {weights} (recorded in the cache) are not there: pass the "
                         f"checkpoint's new path with --teacher-pretrained")
    teacher = create_clip(name, weights, device=device)
    if teacher.fingerprint != provenance["fingerprint"]:
        raise ModelError(f"teacher weights {weights} have fingerprint {teacher.fingerprint[:12]}, the cache was "
                         f"built with {provenance['fingerprint'][:12]}: these are not the cache's teacher weights")
    return teacher
