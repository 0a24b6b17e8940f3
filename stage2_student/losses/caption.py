"""CoCa's captioning loss: the student learns to write the caption of each image (a captioner of its own)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DistillLoss, StudentOutputs, TeacherTargets, register_loss


@register_loss
class Caption(DistillLoss):
    """Teacher-forced next-token cross-entropy of the CoCa's text decoder, as open_clip's `CoCaLoss` caption term.

    L = -(1/|M|) Σ_{(b,t) ∈ M} log softmax(z_{b,t})[y_{b,t+1}], z_{b,t} = decoder logits after the image and
    tokens y_{b,≤t}, M = the non-padding label positions of the batch. Weight 2 (open_clip's
    `--coca-caption-loss-weight`). Needs a CoCa student; no teacher targets, so a sigmoid teacher changes nothing.
    """
    name = "caption"
    default_weight = 2.0
    student_needs = frozenset({"caption_logits", "caption_labels"})

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        # labels carry cross_entropy's default ignore_index (-100) at padding
        return F.cross_entropy(student.caption_logits.float().flatten(0, 1), student.caption_labels.flatten())
