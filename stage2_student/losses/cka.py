"""Relational CKA distillation (RCKA, Zhou et al., "Rethinking Centered Kernel Alignment in Knowledge Distillation")."""
from __future__ import annotations

import torch

from ._ops import normalise
from .base import DistillLoss, StudentOutputs, TeacherTargets, register_loss

_EPS = 1e-8


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F), X (B x D_x) and Y (B x D_y) column-centred; fp32, in [0, 1].

    Equals the cosine between the centred B x B Gram matrices, so D_x != D_y is fine. Centring matters: without
    it (the authors' code) a shared offset dominates both Gram matrices and pushes the value towards 1.
    """
    x, y = x.float(), y.float()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    cross = (y.t() @ x).square().sum()
    return cross / ((x.t() @ x).norm() * (y.t() @ y).norm()).clamp_min(_EPS)


@register_loss
class CKA(DistillLoss):
    """L = [1 - CKA(norm(I_s), I_t)] + [1 - CKA(norm(T_s), T_t)] + [1 - CKA(norm(I_s) norm(T_s)ᵀ, I_t T_tᵀ)].

    Embedding terms compare the student's unprojected embeddings (CKA needs no common width), normalised like the
    teacher's so both Gram matrices are cosine similarities. The third is RCKA's relation ("logit") form on the
    B x B image-text logit matrices; CKA is invariant to isotropic scaling, so the scales s, s_t cancel and are not
    read; nor is a sigmoid model's bias (a constant shift of the logits, removed by the centring). Each term lies
    in [0, 1].

    Default weight 15: the official weight on the logit form. It multiplies each term, so the relation term gets
    exactly the official weight and each embedding term (the same kind of quantity, 1 - cosine of Gram matrices)
    the same; pass `cka:5` to give the sum of the three the official weight instead.

    No local form: CKA centres and normalises over the whole batch (a ratio of batch-wide sums, not a mean over
    rows), so under --local-loss each rank still computes it on the global batch.
    """
    name = "cka"
    default_weight = 15.0
    student_needs = frozenset({"image_emb", "text_emb"})
    teacher_needs = frozenset({"image_emb", "text_emb"})

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        i_s, t_s = normalise(student.image_emb), normalise(student.text_emb)
        i_t, t_t = teacher.image_emb.float(), teacher.text_emb.float()
        return 3 - linear_cka(i_s, i_t) - linear_cka(t_s, t_t) - linear_cka(i_s @ t_s.t(), i_t @ t_t.t())
