"""Model families: what each open_clip tower exposes to distillation, read through the libraries' own APIs.

This is the one module that knows open_clip's and timm's model internals (submodules, private methods, config
keys); the student, the live teacher, the losses' sizes, the build, the captioner, the model factory and the
benchmarks ask it (tests/test_model_internals.py fails on such a read anywhere else). Per tower type:

| tower | hidden states (DLIP) | token map (TokenFD) | attention maps | masked view (MFD) |
|---|---|---|---|---|
| open_clip `VisionTransformer` | block outputs | tokens after `ln_post` | per block | token dropout (`PatchDropout`) |
| open_clip `ModifiedResNet` | stem + 4 stage outputs | final stage map | refused | input patches |
| timm towers (`TimmModel`) | timm's `forward_intermediates` (blocks or stages) | final map, final norm | refused | ViTs: `patch_drop`; others: input patches |
| open_clip `TextTransformer` / CLIP's text | block outputs | - | per block | - |
| `HFTextEncoder` | `output_hidden_states` | - | refused | - |

Image maps come as tokens (B, 1 + H W, W): a summary token first (the class token where the tower has one, else
the map's mean), then the H x W grid row by row, so towers of any family can be compared token to token (the
losses resample grids). Widths and layer counts are measured by a dry forward of the built model
(`describe`), never read from config keys. A feature a tower cannot give is refused before any work
(`check_serves`), naming the loss, the model and the tower type.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from open_clip import CoCa
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import MultimodalTransformer, PatchDropout, TextTransformer, VisionTransformer


# what `forward_features` can return; pooled embeddings are raw (not L2-normalised); "caption_logits" (CoCa
# only) also returns "caption_labels"
FEATURES = frozenset({"image_emb", "text_emb", "image_tokens", "hidden_states", "attentions", "masked_image_emb",
                      "caption_logits"})
IGNORED_LABEL = -100  # caption_labels at padding: F.cross_entropy's default ignore_index
TOKEN_DROPOUT, INPUT_PATCHES = "token dropout", "input patches"


@dataclass(frozen=True)
class TowerInfo:
    """One tower as measured: its type and the sizes of what it exposes."""
    kind: str  # e.g. "open_clip VisionTransformer", "timm ConvNeXt", "HFTextEncoder"
    layer_widths: tuple[int, ...]  # width of each hidden state (block or stage output), first to last
    token_width: int = 0  # width of the final token map (image towers)
    grid: int = 0  # side of the final token map's grid (image towers)
    attention: bool = False  # per-layer attention maps can be read
    masking: str = ""  # image towers: TOKEN_DROPOUT or INPUT_PATCHES


@dataclass(frozen=True)
class ModelInfo:
    image: TowerInfo
    text: TowerInfo
    model_class: str  # open_clip's class: CLIP, CustomTextCLIP, CoCa
    sigmoid: bool  # has a logit bias: trained with the sigmoid (SigLIP) loss
    captioner: bool  # a CoCa: writes captions

    def missing(self, feature: str) -> str | None:
        """Why this model cannot give `feature` (a FEATURES name), or None when it can."""
        if feature == "attentions" and not (self.image.attention and self.text.attention):
            towers = [t.kind for t in (self.image, self.text) if not t.attention]
            return f"attention maps: {' and '.join(towers)} expose none (only open_clip transformer towers do)"
        if feature == "hidden_states" and not (self.image.layer_widths and self.text.layer_widths):
            towers = [t.kind for t in (self.image, self.text) if not t.layer_widths]
            return f"hidden states: {' and '.join(towers)} expose none"
        if feature == "caption_logits" and not self.captioner:
            return (f"captions: a {self.model_class} writes none (a CoCa does: a config with multimodal_cfg, "
                    f"e.g. kd-demo-coca)")
        return None


def is_captioner(model: torch.nn.Module) -> bool:
    """An open_clip CoCa: the CLIP towers plus a text decoder that writes captions (config with `multimodal_cfg`)."""
    return isinstance(model, CoCa)


def text_tower(model) -> torch.nn.Module:
    """The module that holds the text tower: CoCa / CustomTextCLIP keep it apart, CLIP inlines it."""
    return model.text if hasattr(model, "text") else model


def _image_kind(visual) -> str:
    if isinstance(visual, TimmModel):
        return f"timm {type(visual.trunk).__name__}"
    if isinstance(visual, (VisionTransformer, ModifiedResNet)):
        return f"open_clip {type(visual).__name__}"
    return type(visual).__name__


def _text_kind(model) -> str:
    text = text_tower(model)
    if text is model:
        return "open_clip TextTransformer"  # CLIP's inlined text tower is a TextTransformer's pieces
    return f"open_clip {type(text).__name__}" if isinstance(text, TextTransformer) else type(text).__name__


def _prefix_tokens(visual) -> bool:
    """Whether the image tower has prefix (class) tokens that `forward_intermediates` can return apart."""
    if isinstance(visual, VisionTransformer):
        return True
    return isinstance(visual, TimmModel) and getattr(visual.trunk, "num_prefix_tokens", 0) > 0


def _attention_blocks(model) -> dict[str, list]:
    """Per tower, the open_clip residual blocks whose `attn` is torch's MultiheadAttention (or [] for none)."""
    def blocks(transformer) -> list:
        resblocks = list(getattr(transformer, "resblocks", []))
        return resblocks if resblocks and all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention)
                                              for b in resblocks) else []

    visual, text = model.visual, text_tower(model)
    return {"image": blocks(visual.transformer) if isinstance(visual, VisionTransformer) else [],
            "text": blocks(text.transformer) if isinstance(text, TextTransformer) or text is model else []}


def _as_tokens(fmap: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) map (+ its (B, P, C) prefix tokens) -> (B, 1 + H W, C): summary token first, then the grid."""
    grid = fmap.flatten(2).transpose(1, 2)
    summary = prefix[:, :1] if prefix is not None and prefix.shape[1] else grid.mean(1, keepdim=True)
    return torch.cat([summary, grid], dim=1)


def image_intermediates(visual, images: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The raw pooled embedding and every block / stage output as tokens, through the tower's own
    `forward_intermediates` (open_clip's; timm's for timm towers). `normalize` applies the tower's final norm to
    the intermediates (ViTs' `ln_post` / timm's `norm`; CNN maps have none)."""
    extra = _prefix_tokens(visual)
    out = visual.forward_intermediates(images, normalize_intermediates=normalize, output_extra_tokens=extra)
    maps, prefixes = out["image_intermediates"], out.get("image_intermediates_prefix") or [None] * len(
        out["image_intermediates"])
    return out["image_features"], [_as_tokens(m, p) for m, p in zip(maps, prefixes)]


@contextlib.contextmanager
def _hf_hidden_states(encoder: HFTextEncoder, store: list):
    """Ask the Hugging Face model for its hidden states (`output_hidden_states`) during the encoder's own forward."""
    pre = encoder.transformer.register_forward_pre_hook(
        lambda m, a, k: (a, {**k, "output_hidden_states": True}), with_kwargs=True)
    post = encoder.transformer.register_forward_hook(lambda m, i, o: store.extend(o.hidden_states[1:]))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def text_intermediates(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The raw pooled text embedding and every block output (B, L, W)."""
    text = text_tower(model)
    if isinstance(text, HFTextEncoder):
        states: list = []
        with _hf_hidden_states(text, states):
            pooled = model.encode_text(tokens, normalize=False)
        return pooled, states
    if text is model:  # CLIP: its text tower is inlined in the model
        out = model.forward_intermediates(text=tokens, normalize=False)
    elif isinstance(text, TextTransformer):
        out = text.forward_intermediates(tokens, output_fmt="NLC")
    else:
        raise ValueError(f"hidden states: text tower {type(text).__name__} is not supported")
    return out["text_features"], out["text_intermediates"]


def _need_weights(module, args, kwargs):
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def keep_attention_weights(model) -> None:
    """Make every open_clip attention block of `model` compute its per-head weights from now on (the student of an
    attention loss): a block that --grad-checkpointing checkpoints is recomputed in the backward, after
    `forward_features` has returned, and must take the same attention path as in its forward."""
    for blocks in _attention_blocks(model).values():
        for block in blocks:
            block.attn.register_forward_pre_hook(_need_weights, with_kwargs=True)
    model.kd_keeps_attention_weights = True


@contextlib.contextmanager
def _attentions(model, store: dict):
    """Per-head attention weights of every open_clip block (open_clip asks torch for none), recorded during this
    forward only (not during a checkpointed block's recompute)."""
    handles = []
    for tower, blocks in _attention_blocks(model).items():
        for block in blocks:
            if not getattr(model, "kd_keeps_attention_weights", False):
                handles.append(block.attn.register_forward_pre_hook(_need_weights, with_kwargs=True))
            handles.append(block.attn.register_forward_hook(lambda m, i, o, t=tower: store[t].append(o[1])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_input_patches(images: torch.Tensor, patch: int, mask_ratio: float) -> torch.Tensor:
    """Zero (the normalised mean colour) a random `mask_ratio` of each image's patch x patch squares, keeping at
    least one: the masked view for towers without token dropout (CNNs, hybrid towers)."""
    b, _, h, w = images.shape
    rows, cols = max(1, h // patch), max(1, w // patch)
    keep = max(1, round((1 - mask_ratio) * rows * cols))
    order = torch.rand(b, rows * cols, device=images.device).argsort(dim=1)
    kept = torch.zeros(b, rows * cols, device=images.device, dtype=images.dtype).scatter_(1, order[:, :keep], 1.0)
    mask = kept.reshape(b, 1, rows, cols)
    mask = torch.nn.functional.interpolate(mask, size=(rows * patch, cols * patch), mode="nearest")
    mask = torch.nn.functional.pad(mask, (0, w - cols * patch, 0, h - rows * patch), value=1.0)
    return images * mask


@contextlib.contextmanager
def _token_dropout(visual, mask_ratio: float):
    """MAE-style masking inside the tower's own forward: keep a random (1 - mask_ratio) of the patch tokens plus
    the prefix tokens, after the positional embeddings (open_clip's PatchDropout, or timm ViTs' `patch_drop`)."""
    if isinstance(visual, VisionTransformer):
        owner, attr, dropout = visual, "patch_dropout", PatchDropout(mask_ratio, exclude_first_token=True)
    else:
        from timm.layers import PatchDropout as TimmPatchDropout
        owner, attr = visual.trunk, "patch_drop"
        dropout = TimmPatchDropout(mask_ratio, num_prefix_tokens=visual.trunk.num_prefix_tokens)
    original = getattr(owner, attr)
    setattr(owner, attr, dropout.train())
    try:
        yield
    finally:
        setattr(owner, attr, original)


def _masking(visual) -> str:
    if isinstance(visual, VisionTransformer) or (isinstance(visual, TimmModel) and hasattr(visual.trunk, "patch_drop")
                                                 and hasattr(visual.trunk, "num_prefix_tokens")):
        return TOKEN_DROPOUT
    return INPUT_PATCHES


def masked_image_emb(model, images: torch.Tensor, mask_ratio: float, info: ModelInfo) -> torch.Tensor:
    """The raw image embedding of a masked view (`TowerInfo.masking` says how)."""
    if info.image.masking == TOKEN_DROPOUT:
        with _token_dropout(model.visual, mask_ratio):
            return model.encode_image(images, normalize=False)
    patch = max(1, images.shape[-1] // max(info.image.grid, 1))  # one patch per cell of the final map
    return model.encode_image(mask_input_patches(images, patch, mask_ratio), normalize=False)


def image_size(model) -> tuple[int, int]:
    """(height, width) of the images the image tower takes."""
    size = model.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


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


@torch.no_grad()
def describe(model) -> ModelInfo:
    """Measure a model's towers by one dry forward of a 1-sample batch (widths, layer counts, grid)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        images = torch.zeros(1, 3, *image_size(model), device=device)
        _, maps = image_intermediates(model.visual, images, normalize=False)
        context = getattr(text_tower(model), "context_length", None) or getattr(model, "context_length", 77)
        tokens = torch.ones(1, int(context), dtype=torch.long, device=device)
        try:
            _, states = text_intermediates(model, tokens)
            text_widths = tuple(int(s.shape[-1]) for s in states)
        except ValueError:
            text_widths = ()
    finally:
        model.train(was_training)
    attention = {tower: bool(blocks) for tower, blocks in _attention_blocks(model).items()}
    grid = maps[-1].shape[1] - 1
    return ModelInfo(
        image=TowerInfo(kind=_image_kind(model.visual), layer_widths=tuple(int(m.shape[-1]) for m in maps),
                        token_width=int(maps[-1].shape[-1]), grid=int(round(grid ** 0.5)),
                        attention=attention["image"], masking=_masking(model.visual)),
        text=TowerInfo(kind=_text_kind(model), layer_widths=text_widths, attention=attention["text"]),
        model_class=type(model).__name__,
        sigmoid=getattr(model, "logit_bias", None) is not None,
        captioner=is_captioner(model),
    )


def check_serves(info: ModelInfo, features: frozenset[str], model_name: str, role: str, loss_name: str) -> None:
    """Refuse, before any work, a loss that needs `features` this model cannot give (one line: what, who, why)."""
    for feature in sorted(features):
        why = info.missing(feature)
        if why:
            raise ValueError(f"--losses {loss_name}: the {role} {model_name} cannot serve {why}; drop "
                             f"{loss_name!r} from --losses or use a {role} that has them")


def caption_context_length(model) -> int:
    """Tokens a CoCa's text decoder reads, start and end markers included: the longest caption it writes."""
    return int(model.context_length)


def caption_pad_id(model) -> int:
    """The token id a CoCa pads captions with (its caption loss ignores it)."""
    return int(model.pad_id)


def caption_image_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """The image token embeddings a CoCa's text decoder attends to (B, N, W): one image tower forward."""
    return model._encode_image(images)[1]


@contextlib.contextmanager
def _last_position_only(decoder: MultimodalTransformer):
    """Project only the last position to the vocabulary: the (rows, length, vocab) projection of every position
    would be most of a generation step's cost (vocab 49408), and grows with the caption."""
    handle = decoder.ln_final.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


def next_token_logits(model, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A CoCa decoder's logits (B, vocab) for the token after `tokens` (B, L), given `caption_image_tokens`."""
    _, token_embs = model._encode_text(tokens)
    with _last_position_only(model.text_decoder):
        return model.text_decoder(image_tokens, token_embs)[:, -1]


def _caption_forward(model, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The CoCa's embeddings and its teacher-forced next-token logits, each tower run once.

    Logits stop at the batch's longest caption: the decoder is causal, so the positions cut (padding, whose loss
    is ignored) change no logit kept, and the (B, L-1, vocab) logits are the costliest tensor of the step.
    """
    image_emb, image_embs = model._encode_image(images, normalize=False)
    text_emb, token_embs = model._encode_text(tokens, normalize=False)
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    pad = caption_pad_id(model)
    length = int(((tokens != pad) * positions).max())  # the last non-padding token, over the batch
    labels = tokens[:, 1:length]
    return {"image_emb": image_emb, "text_emb": text_emb,
            "caption_logits": model.text_decoder(image_embs, token_embs[:, :length - 1]),
            "caption_labels": labels.masked_fill(labels == pad, IGNORED_LABEL)}


def forward_features(model, images: torch.Tensor | None, tokens: torch.Tensor | None, wanted: frozenset[str],
                     mask_ratio: float = 0.75, info: ModelInfo | None = None) -> dict:
    """Run the towers `wanted` needs; return a dict with the requested FEATURES (the student with grad, the live
    teacher under inference mode). `info` (from `describe`) is needed for the masked view only."""
    unknown = wanted - FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
    if "caption_logits" in wanted and not is_captioner(model):
        raise ValueError(f"caption logits need an open_clip CoCa, not a {type(model).__name__}")
    out: dict = {}
    attentions: dict = {"image": [], "text": []}
    hidden = "hidden_states" in wanted
    with _attentions(model, attentions) if "attentions" in wanted else contextlib.nullcontext():
        if "caption_logits" in wanted:
            out.update(_caption_forward(model, images, tokens))
        else:
            if images is not None and wanted & {"image_emb", "image_tokens", "hidden_states", "attentions"}:
                if hidden or "image_tokens" in wanted:
                    # hidden states are raw block outputs; the token map is the last one after the final norm
                    out["image_emb"], maps = image_intermediates(model.visual, images, normalize=not hidden)
                    if hidden:
                        out["hidden_states"] = {"image": maps}
                    if "image_tokens" in wanted:
                        out["image_tokens"] = (maps[-1] if not hidden else
                                               image_intermediates(model.visual, images, normalize=True)[1][-1])
                else:
                    out["image_emb"] = model.encode_image(images, normalize=False)  # a CoCa's default normalises
            if tokens is not None and wanted & {"text_emb", "hidden_states", "attentions"}:
                if hidden:
                    out["text_emb"], states = text_intermediates(model, tokens)
                    out.setdefault("hidden_states", {})["text"] = states
                else:
                    out["text_emb"] = model.encode_text(tokens, normalize=False)
    if "attentions" in wanted:
        out["attentions"] = attentions
    if "masked_image_emb" in wanted:
        out["masked_image_emb"] = masked_image_emb(model, images, mask_ratio, info or describe(model))
    return out


def set_grad_checkpointing(model) -> list[str]:
    """open_clip's activation checkpointing on both towers (`set_grad_checkpointing`); returns the towers that have
    none in open_clip (a ModifiedResNet image tower), which then run as without."""
    model.set_grad_checkpointing(True)
    return ["image"] if isinstance(model.visual, ModifiedResNet) else []


def compile_towers(model) -> None:
    """torch.compile each tower in place (`nn.Module.compile`, so the state-dict keys stay the model's own): the
    image tower, and the text transformer (a CLIP's is inlined in the model, a CustomTextCLIP's is `model.text`)."""
    model.visual.compile()
    text = text_tower(model)
    (model.transformer if text is model else text).compile()
