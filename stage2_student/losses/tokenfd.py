"""Token-map feature distillation (Wei et al. 2022, "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import resample_tokens
from .base import DistillLoss, Dims, StudentOutputs, TeacherTargets, register_loss


@register_loss
class TokenFD(DistillLoss):
    """L = SmoothL1_{beta=2}(resample(W h_s), LN(h_t)), mean over B x N_t x W_t.

    h_t: all teacher tokens (CLS first) after its final LayerNorm, whitened by a non-affine LayerNorm (eps 1e-5),
    so the target's scale and offset per token do not matter. h_s: all student tokens after its final norm, through
    a per-token Linear W_s -> W_t (the paper's 1x1 conv); when the grids differ the student's patch grid is resampled
    bilinearly to the teacher's (CLS kept). Weight 1 (the paper trains with this loss alone).

    Any tower family (`common.families`): tokens are a summary token (the class token, or a CNN map's mean) and
    the final map's grid. Sigmoid teacher or student: token maps only, scales and biases play no part.
    """
    name = "tokenfd"
    default_weight = 1.0
    student_needs = frozenset({"image_tokens"})
    teacher_needs = frozenset({"image_tokens"})

    def __init__(self, dims: Dims):
        super().__init__(dims)
        if not (dims.student_vision_width and dims.teacher_vision_width):
            raise ValueError("tokenfd needs Dims.student_vision_width and Dims.teacher_vision_width (the live "
                             "teacher's, measured by common.families.describe)")
        self.proj = nn.Linear(dims.student_vision_width, dims.teacher_vision_width)

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        target = teacher.image_tokens.float()
        target = F.layer_norm(target, target.shape[-1:], eps=1e-5)
        pred = resample_tokens(self.proj(student.image_tokens.float()), target.shape[1])
        return F.smooth_l1_loss(pred, target, beta=2.0)
