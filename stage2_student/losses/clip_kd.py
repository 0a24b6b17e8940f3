"""The CLIP-KD losses (Yang et al., CVPR 2024): task, CRD, FD, MFD, GD (+ the official 4-term GD), ICL, AFD.

Notation of docs/LOSSES.md. Default weights are the official ones (paper / winycg/CLIP-KD scripts) except GD,
whose official 1e8 compensated a bug (see `GD`). Inputs are cast to float32; `LossSet` runs the losses with
autocast off, so the matmuls stay in float32 too.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.contrastive import clip_loss, contrastive_loss, contrastive_loss_grads

from ._ops import LogitScale, anchors, diag_ce, normalise
from .base import DistillLoss, Dims, StudentOutputs, TeacherTargets, register_loss

_TEACHER_EMB = frozenset({"image_emb", "text_emb"})
_TEACHER_EMB_SCALE = _TEACHER_EMB | {"logit_scale"}
_STUDENT_PROJ = frozenset({"image_emb_proj", "text_emb_proj"})


@register_loss
class Task(DistillLoss):
    """The student's own contrastive loss, the one its architecture trains with. Weight 1.

    Softmax CLIP: 0.5 [CE(s I Tᵀ, y) + CE(s T Iᵀ, y)], I = norm(I_s), T = norm(T_s). A student with a logit bias
    (SigLIP-style config, `init_logit_bias`) trains with the sigmoid loss -(1/B) sum_ij log σ(y_ij (s I_i·T_j + b)),
    y = 2 Id - 1 (open_clip's `SigLipLoss`), so its bias learns. Reads no teacher target.

    Local form (--local-loss): the rank's image rows against every text and its text rows against every image
    (sigmoid: its image rows against every text), labels offset to the rows' place, as open_clip's `ClipLoss`.
    """
    name = "task"
    default_weight = 1.0
    student_needs = frozenset({"image_emb", "text_emb", "logit_scale", "logit_bias"})
    local_form = True

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        bias = None if student.logit_bias is None else student.logit_bias.float()
        return contrastive_loss(normalise(student.image_emb), normalise(student.text_emb),
                                student.logit_scale.float(), bias, student.rows)


@register_loss
class CRD(DistillLoss):
    """Contrastive relational distillation (KL between image-text similarity distributions).

    L = 0.5 [KL(softmax(Z_t) ‖ softmax(Z_s)) + KL(softmax(Z_tᵀ) ‖ softmax(Z_sᵀ))], row-wise, batchmean, T = 1,
    Z_t = s_t I_t T_tᵀ, Z_s = s norm(I_s) norm(T_s)ᵀ on the *unprojected* student embeddings (a B x B matrix
    whatever D_s). Weight 1 (paper / official `--alpha_ckd_loss 1`).

    Several teachers ("joint"): softmax(Z_t) is replaced by the ensemble's mean distribution (1/K) sum_k
    softmax(Z_t^k), each teacher at its own scale s_t^k. Similarity distributions over the same batch are
    comparable across teachers of any width, unlike their embeddings. Its gradient equals that of DataCompDR's
    mean of per-teacher KLs (the two differ by a constant, the teachers' entropies' Jensen gap).

    Sigmoid teacher or student: the distributions are softmaxes of s_t I_t T_tᵀ and s I Tᵀ at each one's own
    scale; a bias adds the same constant to every logit of a row, so it cancels and is not read.

    Local form (--local-loss): the KL of the rank's image rows (over every text) and of its text rows (over every
    image); both distributions are row-wise, so nothing else of the B x B matrices is needed.
    """
    name = "crd"
    default_weight = 1.0
    teacher_needs = _TEACHER_EMB_SCALE
    ensemble = "joint"
    local_form = True

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        return self.forward_teachers(student, [teacher])

    def forward_teachers(self, student: StudentOutputs, teachers: list[TeacherTargets]) -> torch.Tensor:
        rows, s = student.rows, student.logit_scale.float()
        image, text = normalise(student.image_emb), normalise(student.text_emb)

        def kl(s: torch.Tensor, t: list[torch.Tensor]) -> torch.Tensor:
            log_mean = torch.stack([z.log_softmax(1) for z in t]).logsumexp(0) - math.log(len(t))
            return F.kl_div(s.log_softmax(1), log_mean, reduction="batchmean", log_target=True)

        image_rows = kl(s * anchors(image, rows) @ text.t(),
                        [t.logit_scale * anchors(t.image_emb.float(), rows) @ t.text_emb.float().t() for t in teachers])
        text_rows = kl(s * anchors(text, rows) @ image.t(),
                       [t.logit_scale * anchors(t.text_emb.float(), rows) @ t.image_emb.float().t() for t in teachers])
        return 0.5 * (image_rows + text_rows)


@register_loss
class FD(DistillLoss):
    """Feature distillation: MSE(norm(P_v I_s), I_t) + MSE(norm(P_t T_s), T_t), each the mean over B x D_t.

    Weight 2000 (paper / official `--alpha_fd_loss 2000`).

    Several teachers (per teacher, averaged): each through the student's own projection into that teacher's
    space, since teachers' embeddings differ in width and basis and have no meaningful average. Sigmoid teacher or
    student: embeddings only, so scale and bias play no part. Local form (--local-loss): the rank's rows.
    """
    name = "fd"
    default_weight = 2000.0
    student_needs = _STUDENT_PROJ
    teacher_needs = _TEACHER_EMB
    local_form = True
    image_field: ClassVar[str] = "image_emb_proj"  # which student image embedding is matched (MFD: masked view)

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        rows = student.rows
        image = normalise(anchors(getattr(student, self.image_field), rows))
        return (F.mse_loss(image, anchors(teacher.image_emb, rows).float())
                + F.mse_loss(normalise(anchors(student.text_emb_proj, rows)), anchors(teacher.text_emb, rows).float()))


@register_loss
class MFD(FD):
    """Masked feature distillation: FD with the image term on the student's MAE-masked view.

    L = MSE(norm(P_v I_s^masked), I_t) + MSE(norm(P_t T_s), T_t), I_t = teacher embedding of the *unmasked* view.
    The loop builds `masked_image_emb_proj` by keeping a random (1 - `mask_ratio`) of the patch tokens (plus CLS)
    per sample; the public code computed the masked forward and then used the full image, so this loss never
    reads `image_emb_proj`. Weight 2000, mask ratio 0.75 (paper / official). Several teachers, sigmoid models: as
    FD. The masked view is the tower family's (`common.families`): token dropout in ViTs (open_clip's and timm's),
    masked input patches (zeroed cells of the final feature map's grid) in CNNs and hybrid towers.
    """
    name = "mfd"
    default_weight = 2000.0
    mask_ratio: ClassVar[float] = 0.75
    student_needs = frozenset({"masked_image_emb_proj", "text_emb_proj"})
    image_field = "masked_image_emb_proj"


def _teacher_grads(teacher: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached teacher grads of this exact batch when present, else recomputed exactly from its embeddings, with the
    teacher's own loss (sigmoid when it has a bias)."""
    if teacher.image_grad is not None and teacher.text_grad is not None:
        return teacher.image_grad.float(), teacher.text_grad.float()
    return contrastive_loss_grads(teacher.image_emb.float(), teacher.text_emb.float(), teacher.logit_scale,
                                  teacher.logit_bias)


@register_loss
class GD(DistillLoss):
    """Gradient distillation on the symmetric CLIP loss, per modality.

    g_img, g_txt = dL/dI, dL/dT of L = clip_loss(I, T, c) (`common.contrastive.clip_loss_grads`):
      g_img = 0.5 c [(P - Y) T + (Q - Y)ᵀ T] / B, g_txt likewise.
    Student: I = norm(P_v I_s), T = norm(P_t T_s), c = s (differentiable). Teacher: cached grads of this batch,
    else recomputed from (I_t, T_t, s_t). L_GD = MSE(g_img_s, g_img_t) + MSE(g_txt_s, g_txt_t), means over B x D_t.

    Default weight 3e4, calibrated so the weighted GD starts on the order of the task loss (ln 256 = 5.5 at
    B = 256). The official 1e8 compensated a bug: dividing by the scale instead of multiplying shrinks the
    gradients by c^2 ~ 1e4 and the MSE by ~1e8. A gradient row is (c / B) r_i, r_i = ‖0.5[(P-Y)T + (Q-Y)ᵀT]_i‖,
    so each modality's MSE ~ c^2 r^2 / (B^2 D). At initialisation the student (c ~ 14, P ~ uniform, r ~ 1) adds
    ~2 * 14^2 / (B^2 D) ~ 1e-5 and the teacher (c = 100, r ~ 0.15-0.55: the rows it still gets wrong) dominates:
    on synthetic teacher batches (B = 256, D = 512) whose own CLIP loss is 0.3-1.9, L_GD = 6e-5 to 3e-4, i.e.
    1.8-9 after weighting. The raw value scales as 1/(B^2 D): use w ~ 3e4 (B/256)^2 (D/512) for other setups.

    Several teachers (per teacher, averaged): a teacher's gradients live in its own embedding space, so each is
    matched by the student's projection into that space.

    Sigmoid teacher (bias b_t): both gradients are those of the teacher's loss, the sigmoid loss
    (`common.contrastive.sigmoid_loss_grads`): the teacher's at (s_t, b_t), the student's at its own scale s and
    its own bias when it has one, else at b_t (the gradient's shape depends on the bias; a softmax student has
    none to offer). The calibration above is the softmax loss's; the sigmoid gradients are of the same order.

    No local form: a row of g_img needs its column of Q, i.e. every text row's softmax over the whole batch, so
    under --local-loss each rank still computes the global B x B form.
    """
    name = "gd"
    default_weight = 3e4
    student_needs = _STUDENT_PROJ | {"logit_scale", "logit_bias"}
    teacher_needs = _TEACHER_EMB_SCALE | {"logit_bias"}
    teacher_optional = frozenset({"image_grad", "text_grad"})

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        bias = None
        if teacher.logit_bias is not None:
            bias = student.logit_bias.float() if student.logit_bias is not None else teacher.logit_bias
        g_img_s, g_txt_s = contrastive_loss_grads(normalise(student.image_emb_proj),
                                                  normalise(student.text_emb_proj), student.logit_scale.float(), bias)
        g_img_t, g_txt_t = _teacher_grads(teacher)
        return F.mse_loss(g_img_s, g_img_t) + F.mse_loss(g_txt_s, g_txt_t)


def anchored_grads(p: torch.Tensor, k: torch.Tensor, c: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grads of the one-directional CE(c p kᵀ, y): dL/dp = c (P - Y) k / B, dL/dk = c (P - Y)ᵀ p / B."""
    residual = (c * p @ k.t()).softmax(dim=1) - torch.eye(p.shape[0], device=p.device, dtype=p.dtype)
    return c * residual @ k / p.shape[0], c * residual.t() @ p / p.shape[0]


@register_loss
class GD4(DistillLoss):
    """The official 4-term GD with the true gradient (multiplied by the scale, not divided).

    For the image-anchored pair (p = I, k = T) and the text-anchored pair (p = T, k = I), `anchored_grads` of the
    student (norm(P_v I_s), norm(P_t T_s), s) and of the teacher (I_t, T_t, s_t): the sum of the 4 MSEs.
    Teacher grads are always recomputed from the cached embeddings (the cache stores only the symmetric sums).
    Default weight 1.2e4: four unhalved one-directional gradients make the raw value 2.3-2.5x GD's in the setup
    GD is calibrated on, so GD's 3e4 / 2.5 (same (B/256)^2 (D/512) scaling). Several teachers: as GD.

    Sigmoid teacher: refused. The four terms are the two directions of the softmax loss, and the sigmoid loss has
    no directions; use `gd`, which matches the sigmoid loss's own gradients. A sigmoid student is fine (its
    embeddings are matched; its bias is not read). No local form (as GD: dL/dk needs every row's softmax).
    """
    name = "gd4"
    sigmoid_teacher = False
    default_weight = 1.2e4
    student_needs = _STUDENT_PROJ | {"logit_scale"}
    teacher_needs = _TEACHER_EMB_SCALE

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        i_s, t_s, s = normalise(student.image_emb_proj), normalise(student.text_emb_proj), student.logit_scale.float()
        i_t, t_t, s_t = teacher.image_emb.float(), teacher.text_emb.float(), teacher.logit_scale
        student_grads = anchored_grads(i_s, t_s, s) + anchored_grads(t_s, i_s, s)
        teacher_grads = anchored_grads(i_t, t_t, s_t) + anchored_grads(t_t, i_t, s_t)
        return sum(F.mse_loss(g_s, g_t) for g_s, g_t in zip(student_grads, teacher_grads))


@register_loss
class ICL(DistillLoss):
    """Interactive contrastive learning: student anchors against teacher keys.

    L = 0.5 [CE(c_x norm(P_v I_s) T_tᵀ, y) + CE(c_x norm(P_t T_s) I_tᵀ, y)], c_x = min(exp(param), 100), param
    learnable, init log(1/0.07) (the public code used the raw param, i.e. temperature ~0.38). Weight 1 (paper /
    official `--alpha_icl_loss 1`).

    Several teachers (per teacher, averaged): the student's anchors in each teacher's space against that teacher's
    keys, each pair with its own learnable scale (the teachers' similarity sharpness differs). Sigmoid teacher or
    student: as written, a softmax CE over the teacher's keys with the loss's own scale; neither model's scale or
    bias is read (the CLIP-KD form: the keys are what the teacher contributes). Local form (--local-loss): the
    rank's student anchors against every teacher key.
    """
    name = "icl"
    default_weight = 1.0
    student_needs = _STUDENT_PROJ
    teacher_needs = _TEACHER_EMB
    local_form = True

    def __init__(self, dims: Dims):
        super().__init__(dims)
        self.scale = LogitScale()

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        c, rows = self.scale(), student.rows
        image, text = normalise(anchors(student.image_emb_proj, rows)), normalise(anchors(student.text_emb_proj, rows))
        return 0.5 * (diag_ce(c * image @ teacher.text_emb.float().t(), rows)
                      + diag_ce(c * text @ teacher.image_emb.float().t(), rows))


@register_loss
class AFD(DistillLoss):
    """Augmented feature distillation: a CLIP loss on student-teacher fused features.

    F_img = norm(W_img [norm(P_v I_s) ‖ I_t]), F_txt = norm(W_txt [norm(P_t T_s) ‖ T_t]), W = Linear(2 D_t -> D_t);
    L = clip_loss(F_img, F_txt, c), c = min(exp(param), 100), param init log(1/0.07). Both halves are D_t wide
    (the public code sized W as D_s + D_t -> D_s, wrong when D_s != D_t). Weight 1 (paper).

    Several teachers (per teacher, averaged): one fusion layer per teacher, sized for its width D_t. Sigmoid
    teacher or student: as written (a softmax CLIP loss on the fused features at the loss's own scale). Local form
    (--local-loss): every row is fused (per sample, cheap), the CLIP loss anchors on the rank's rows.
    """
    name = "afd"
    default_weight = 1.0
    student_needs = _STUDENT_PROJ
    teacher_needs = _TEACHER_EMB
    local_form = True

    def __init__(self, dims: Dims):
        super().__init__(dims)
        self.image_fusion = nn.Linear(2 * dims.teacher_embed, dims.teacher_embed)
        self.text_fusion = nn.Linear(2 * dims.teacher_embed, dims.teacher_embed)
        self.scale = LogitScale()

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        def fuse(fusion: nn.Linear, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return normalise(fusion(torch.cat([normalise(s), t.float()], dim=1)))

        return clip_loss(fuse(self.image_fusion, student.image_emb_proj, teacher.image_emb),
                         fuse(self.text_fusion, student.text_emb_proj, teacher.text_emb), self.scale(), student.rows)
