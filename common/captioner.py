"""Synthetic captions (MobileCLIP's DataCompDR): an open_clip CoCa writes several captions per image.

Several sampled captions per image are a richer text target than the one web caption: nucleus sampling (keep the
most likely tokens that hold `top_p` of the probability mass, draw among them) gives diverse yet fluent captions,
where beam search would give near-copies of one caption.

The sampling loop is the top-p branch of open_clip's `CoCa.generate` (same steps: encode the image once, one
decoder forward per token, eos forced at `seq_len`) written out here, because open_clip 3.3's `generate` refuses
to run with transformers >= 5 (it imports `BeamSearchScorer`, which transformers 5 removed, for every generation
type). Written out, it needs no transformers and draws from its own seeded generator.
"""
from __future__ import annotations

import torch

from common.families import (caption_context_length, caption_image_tokens, caption_pad_id, is_captioner,
                             next_token_logits)
from common.models import LoadedCLIP

TOP_P = 0.9  # the nucleus: the smallest set of tokens holding 90% of the probability mass
TEMPERATURE = 1.0  # the decoder's own distribution, neither sharpened nor flattened
MIN_TOKENS = 4  # tokens drawn before the end-of-text marker may be (open_clip's min_seq_len 5 counts the start)


def _nucleus_sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-p nucleus. Only the columns up to the
    widest nucleus are drawn from (a few of the 49408): the same distribution, at a fraction of the cost."""
    probs, order = (logits.float() / TEMPERATURE).softmax(-1).sort(-1, descending=True)
    outside = probs.cumsum(-1) - probs >= TOP_P  # the mass before a token already reaches top_p; keeps the first
    width = int((~outside).sum(-1).max())
    choice = torch.multinomial(probs[:, :width].masked_fill(outside[:, :width], 0.0), 1, generator=generator)
    return order.gather(-1, choice)


def caption_images(captioner: LoadedCLIP, images: torch.Tensor, num: int, seed: int,
                   seq_len: int | None = None) -> list[list[str]]:
    """`num` sampled captions for each image (preprocessed, (B, 3, H, W)), as plain strings.

    Deterministic for a given (seed, images batch): draws come from a generator seeded with `seed` (the global RNG
    is untouched), in the batch's order. `seq_len` bounds a caption's tokens, start and end markers included
    (default: the model's context length, what it was trained on).
    """
    model = captioner.model
    if not is_captioner(model):
        raise ValueError(f"{captioner.name} is a {type(model).__name__}, not a captioner: synthetic captions need an "
                         f"open_clip CoCa (a model config with multimodal_cfg, e.g. kd-demo-coca)")
    context = caption_context_length(model)
    seq_len = context if seq_len is None else seq_len
    if not MIN_TOKENS + 2 <= seq_len <= context:
        raise ValueError(f"seq_len {seq_len}: give {MIN_TOKENS + 2} to {captioner.name}'s context length {context}")
    tokenizer, device = captioner.tokenizer, next(model.parameters()).device
    sot, eot, pad = tokenizer.sot_token_id, tokenizer.eot_token_id, caption_pad_id(model)
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), captioner.autocast():
            # each image encoded once; image i's captions are rows i*num .. i*num+num-1
            image_tokens = caption_image_tokens(model, images.to(device)).repeat_interleave(num, dim=0)
            out = torch.full((len(image_tokens), 1), sot, dtype=torch.long, device=device)
            done = torch.zeros(len(image_tokens), dtype=torch.bool, device=device)
            while not done.all() and out.shape[1] < seq_len:
                live = torch.nonzero(~done).flatten()  # finished captions leave the batch: no more forwards
                logits = next_token_logits(model, image_tokens[live], out[live])
                if not torch.isfinite(logits).all():
                    rows = live[~torch.isfinite(logits).all(-1)][:4].tolist()
                    raise ValueError(f"{captioner.name}: non-finite next-token logits at token {out.shape[1]} for "
                                     f"caption rows {rows} (images {[r // num for r in rows]}): check the "
                                     f"captioner's weights and the images' preprocessing")
                logits[:, pad] = -torch.inf  # the padding id ends nothing: training never asks for it
                if out.shape[1] <= MIN_TOKENS:
                    logits[:, eot] = -torch.inf
                token = torch.full((len(image_tokens),), pad, dtype=torch.long, device=device)
                token[live] = _nucleus_sample(logits, generator).squeeze(1)
                if out.shape[1] + 1 == seq_len:
                    token[live] = eot
                out = torch.cat([out, token[:, None]], dim=1)
                done |= token == eot
    finally:
        model.train(was_training)
    texts = [_decode(tokenizer, row[1:].tolist(), eot) for row in out.cpu()]
    return [texts[i * num:(i + 1) * num] for i in range(len(images))]


def _decode(tokenizer, ids: list[int], eot: int) -> str:
    """Text of the ids before the end-of-text marker (start marker already dropped; padding comes after it)."""
    return tokenizer.decode(ids[:ids.index(eot)] if eot in ids else ids).strip()
