"""The symmetric CLIP loss and its exact gradient w.r.t. the normalised embeddings (the GD target)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """L = 0.5 [CE(c I Tᵀ, y) + CE(c T Iᵀ, y)], y = arange(B); I, T already L2-normalised."""
    logits = scale * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_loss_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form dL/dI and dL/dT of `clip_loss` (differentiable, so a student can be trained to match it).

    With logits = c I Tᵀ, P = softmax over rows, Q = softmax over columns (text-anchored), Y = identity:
      g_img = 0.5 c [(P - Y) T + (Q - Y)ᵀ T] / B   with Q = softmax(c T Iᵀ) rows, transposed back;
      g_txt = 0.5 c [(P - Y)ᵀ I + (Q - Y) I] / B.
    Computed in float32 whatever the input dtype.
    """
    image, text = image.float(), text.float()
    batch = image.shape[0]
    logits = scale * image @ text.t()
    eye = torch.eye(batch, device=image.device, dtype=image.dtype)
    p_i2t = logits.softmax(dim=1) - eye  # image-anchored: rows = images
    p_t2i = logits.t().softmax(dim=1) - eye  # text-anchored: rows = texts
    g_img = 0.5 * scale * (p_i2t @ text + p_t2i.t() @ text) / batch
    g_txt = 0.5 * scale * (p_i2t.t() @ image + p_t2i @ image) / batch
    return g_img, g_txt
