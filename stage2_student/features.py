"""One forward of an open_clip model that also returns the internals some losses read.

Token maps, per-layer hidden states and attention maps are captured with forward hooks on open_clip's modules
(`visual.ln_post`, each `resblocks[i]`, each block's `attn`), so nothing of open_clip is copied or patched.
The same function serves the student (with grad) and the live teacher (under inference mode).
"""
from __future__ import annotations

import contextlib

import torch
from open_clip.transformer import PatchDropout

# what `forward_features` can return; pooled embeddings are raw (not L2-normalised)
FEATURES = frozenset({"image_emb", "text_emb", "image_tokens", "hidden_states", "attentions", "masked_image_emb"})


def _towers(model) -> dict[str, torch.nn.Module]:
    return {"image": model.visual.transformer, "text": model.transformer}


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


def forward_features(model, images: torch.Tensor | None, tokens: torch.Tensor | None, wanted: frozenset[str],
                     mask_ratio: float = 0.75) -> dict:
    """Run the towers `wanted` needs; return a dict with the requested FEATURES."""
    unknown = wanted - FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
    out: dict = {}
    with _captured(model, wanted) as store:
        if wanted & {"image_emb", "image_tokens", "hidden_states", "attentions"} and images is not None:
            out["image_emb"] = model.encode_image(images)
        if wanted & {"text_emb", "hidden_states", "attentions"} and tokens is not None:
            out["text_emb"] = model.encode_text(tokens)
    if "image_tokens" in wanted:
        out["image_tokens"] = store["image_tokens"]
    for name in ("hidden_states", "attentions"):
        if name in wanted:
            out[name] = store[name]
    if "masked_image_emb" in wanted:
        with _masked_patches(model.visual, mask_ratio):
            out["masked_image_emb"] = model.encode_image(images)
    return out
