"""One forward of an open_clip model that also returns the internals some losses read.

Token maps, per-layer hidden states and attention maps are captured with forward hooks on open_clip's modules
(`visual.ln_post`, each `resblocks[i]`, each block's `attn`), so nothing of open_clip is copied or patched.
The same function serves the student (with grad) and the live teacher (under inference mode).
A CoCa's caption logits come from its own pieces (`_encode_image`, `_encode_text`, `text_decoder`), run once
for the embeddings and the captions together.
"""
from __future__ import annotations

import contextlib

import torch
from open_clip.transformer import PatchDropout

from common.captioner import is_captioner

# what `forward_features` can return; pooled embeddings are raw (not L2-normalised); "caption_logits" (CoCa
# only) also returns "caption_labels"
FEATURES = frozenset({"image_emb", "text_emb", "image_tokens", "hidden_states", "attentions", "masked_image_emb",
                      "caption_logits"})
IGNORED_LABEL = -100  # caption_labels at padding: F.cross_entropy's default ignore_index


def _towers(model) -> dict[str, torch.nn.Module]:
    text = model.text if hasattr(model, "text") else model  # CoCa / CustomTextCLIP keep the text tower apart
    return {"image": model.visual.transformer, "text": text.transformer}


@contextlib.contextmanager
def _captured(model, wanted: frozenset[str]):
    store: dict = {"hidden_states": {"image": [], "text": []}, "attentions": {"image": [], "text": []}}
    handles = []
    if "image_tokens" in wanted:  # all tokens (CLS first) after the final LayerNorm
        handles.append(model.visual.ln_post.register_forward_hook(lambda m, i, o: store.__setitem__("image_tokens", o)))
    for tower, transformer in _towers(model).items():
        for block in transformer.resblocks:
            if "hidden_states" in wanted:
                handles.append(block.register_forward_hook(
                    lambda m, i, o, t=tower: store["hidden_states"][t].append(o)))
            if "attentions" in wanted:
                # open_clip asks for no weights; ask for per-head weights instead
                handles.append(block.attn.register_forward_pre_hook(
                    lambda m, a, k: (a, {**k, "need_weights": True, "average_attn_weights": False}), with_kwargs=True))
                handles.append(block.attn.register_forward_hook(
                    lambda m, i, o, t=tower: store["attentions"][t].append(o[1])))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _masked_patches(visual, mask_ratio: float):
    """MAE-style masking inside the student's own forward: open_clip's PatchDropout keeps a random
    (1 - mask_ratio) of the patch tokens plus CLS, after the positional embeddings are added."""
    original, was_training = visual.patch_dropout, visual.training
    visual.patch_dropout = PatchDropout(mask_ratio, exclude_first_token=True)
    visual.patch_dropout.train()
    try:
        yield
    finally:
        visual.patch_dropout = original
        visual.train(was_training)


def _caption_forward(model, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The CoCa's embeddings and its teacher-forced next-token logits, each tower run once.

    Logits stop at the batch's longest caption: the decoder is causal, so the positions cut (padding, whose loss
    is ignored) change no logit kept, and the (B, L-1, vocab) logits are the costliest tensor of the step.
    """
    image_emb, image_embs = model._encode_image(images, normalize=False)
    text_emb, token_embs = model._encode_text(tokens, normalize=False)
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    length = int(((tokens != model.pad_id) * positions).max())  # the last non-padding token, over the batch
    labels = tokens[:, 1:length]
    return {"image_emb": image_emb, "text_emb": text_emb,
            "caption_logits": model.text_decoder(image_embs, token_embs[:, :length - 1]),
            "caption_labels": labels.masked_fill(labels == model.pad_id, IGNORED_LABEL)}


def forward_features(model, images: torch.Tensor | None, tokens: torch.Tensor | None, wanted: frozenset[str],
                     mask_ratio: float = 0.75) -> dict:
    """Run the towers `wanted` needs; return a dict with the requested FEATURES."""
    unknown = wanted - FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
    if "caption_logits" in wanted and not is_captioner(model):
        raise ValueError(f"caption logits need an open_clip CoCa, not a {type(model).__name__}")
    out: dict = {}
    with _captured(model, wanted) as store:
        if "caption_logits" in wanted:
            out.update(_caption_forward(model, images, tokens))
        else:
            if wanted & {"image_emb", "image_tokens", "hidden_states", "attentions"} and images is not None:
                out["image_emb"] = model.encode_image(images, normalize=False)  # a CoCa's default normalises
            if wanted & {"text_emb", "hidden_states", "attentions"} and tokens is not None:
                out["text_emb"] = model.encode_text(tokens, normalize=False)
    if "image_tokens" in wanted:
        out["image_tokens"] = store["image_tokens"]
    for name in ("hidden_states", "attentions"):
        if name in wanted:
            out[name] = store[name]
    if "masked_image_emb" in wanted:
        with _masked_patches(model.visual, mask_ratio):
            out["masked_image_emb"] = model.encode_image(images, normalize=False)
    return out
