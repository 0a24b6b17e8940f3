"""The teachers' and students' own contrastive losses and their exact gradients w.r.t. the normalised embeddings
(the GD target): the symmetric softmax CLIP loss, and the sigmoid (SigLIP) loss of models with a logit bias.
`contrastive_loss` / `contrastive_loss_grads` pick the one a model was trained with: sigmoid when it has a bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """L = 0.5 [CE(c I Tᵀ, y) + CE(c T Iᵀ, y)], y = arange(B); I, T already L2-normalised.

    `rows`: the indices of a rank's anchor rows in its local form (open_clip's --local-loss): image rows I[rows]
    against every text and text rows T[rows] against every image, each labelled with its own place; the mean
    over those rows.
    """
    if rows is None:
        logits = scale * image @ text.t()
        labels = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return 0.5 * (F.cross_entropy(scale * image[rows] @ text.t(), rows)
                  + F.cross_entropy(scale * text[rows] @ image.t(), rows))


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


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
                 bias: torch.Tensor | float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP: L = -(1/B) sum_ij log sigmoid(y_ij (c I_i·T_j + b)), y = 2 Id - 1 (open_clip's `SigLipLoss` on the
    whole batch; on several ranks it gives the same gradients, summed over ranks' image rows). `rows`: a rank's
    local form, image rows I[rows] against every text, the same per-row sum divided by the rows' count."""
    anchors = image if rows is None else image[rows]
    logits = scale * anchors @ text.t() + bias
    n = anchors.shape[0]
    labels = torch.full_like(logits, -1.0)
    labels[torch.arange(n, device=image.device), torch.arange(n, device=image.device) if rows is None else rows] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def sigmoid_loss_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
                       bias: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form dL/dI and dL/dT of `sigmoid_loss` (differentiable), in float32:
    G = dL/dZ = -(1/B) y ⊙ sigmoid(-y ⊙ Z), Z = c I Tᵀ + b;  g_img = c G T,  g_txt = c Gᵀ I."""
    image, text = image.float(), text.float()
    logits = scale * image @ text.t() + bias
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=image.dtype) - 1
    g = -labels * torch.sigmoid(-labels * logits) / image.shape[0]
    return scale * g @ text, scale * g.t() @ image


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
                     bias: torch.Tensor | float | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a model with this scale and bias trains with: `sigmoid_loss` with a bias, else `clip_loss`
    (`rows`: a rank's local form, see each)."""
    return clip_loss(image, text, scale, rows) if bias is None else sigmoid_loss(image, text, scale, bias, rows)


def contrastive_loss_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
                           bias: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradients of `contrastive_loss`."""
    return clip_loss_grads(image, text, scale) if bias is None else sigmoid_loss_grads(image, text, scale, bias)
