"""DLIP layer-wise distillation (Kuang et al. 2023, "DLIP: Distilling Language-Image Pre-training").

Two losses, so each can be weighted (or left out) on its own and the loop extracts attention maps only when
asked: `dlip` (hidden representations, the paper's stronger signal) and `dlip_attn` (attention maps).
Both use all student layers, mapped by `map_layers`, for the image and the text tower, average over the mapped
pairs (so weight 1 does not depend on depth) and sum the two towers. Vision token grids that differ are resampled
bilinearly to the teacher's (CLS kept); text sequences must have the same length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import resample_tokens
from .base import DistillLoss, Dims, StudentOutputs, TeacherTargets, register_loss

TOWERS = ("image", "text")


def map_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) for each student layer m: round((m + 1) L_t / L_s) - 1, halves rounded up."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive, got {student_layers} and {teacher_layers}")
    # integer round-half-up of (m+1) L_t / L_s; max(0, .) only matters for a student deeper than twice the teacher
    return [max(0, (2 * (m + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)
            for m in range(student_layers)]


def _align_tokens(tower: str, x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    if tower == "image":
        return resample_tokens(x, n_tokens)
    if x.shape[1] != n_tokens:
        raise ValueError(f"dlip: student text has {x.shape[1]} tokens, teacher {n_tokens}: use one context length")
    return x


def _align_attention(tower: str, a: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, H, N, N) -> (B, H, n, n): resample the query axis, then the key axis, and renormalise rows."""
    if a.shape[-1] == n_tokens:
        return a
    b, h, n, _ = a.shape
    x = _align_tokens(tower, a.reshape(b * h, n, n), n_tokens)  # queries; keys play the width
    x = _align_tokens(tower, x.transpose(1, 2), n_tokens).transpose(1, 2)
    return (x / x.sum(-1, keepdim=True)).reshape(b, h, n_tokens, n_tokens)


def attention_kl(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """KL(A_t ‖ A_s), summed over keys, mean over batch, heads and queries; heads averaged if their counts differ."""
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
    # 0 log 0 = 0: entries where A_t = 0 (causal masks) contribute nothing. log A_s is taken only where A_t > 0
    # (elsewhere of 1), so the gradient -A_t / A_s stays exact however small A_s is (a clamp would zero it), and
    # masked entries, where A_s = 0 too, get a zero gradient instead of 0 / 0
    log_a_s = torch.where(a_t > 0, a_s, torch.ones_like(a_s)).log()
    return (torch.xlogy(a_t, a_t) - a_t * log_a_s).sum(-1).mean()


def _layers(dims: Dims, tower: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The student's and the teacher's widths of each hidden state of a tower."""
    return ((dims.student_vision_layers, dims.teacher_vision_layers) if tower == "image"
            else (dims.student_text_layers, dims.teacher_text_layers))


@register_loss
class DLIPRep(DistillLoss):
    """L = sum_towers mean_m MSE(W_m h_s^m, h_t^{map(m)}), h: (B, N, W) hidden states, W_m = Linear(W_s^m -> W_t^map(m)).

    Weight 1 (DLIP adds its distillation terms to the pre-training loss unweighted). Hidden states are each tower
    family's (`common.families`): transformer block outputs, or a CNN's stage outputs as tokens (summary token +
    grid), whose widths differ per stage, hence one projection per mapped pair. Sigmoid teacher or student: hidden
    states only, scales and biases play no part.
    """
    name = "dlip"
    default_weight = 1.0
    student_needs = frozenset({"hidden_states"})
    teacher_needs = frozenset({"hidden_states"})

    def __init__(self, dims: Dims):
        super().__init__(dims)
        if not all(all(_layers(dims, t)) for t in TOWERS):
            raise ValueError(f"dlip needs the widths of every vision and text hidden state in Dims (measured from "
                             f"the student and the live teacher), got {dims}")
        self.layer_map = {t: map_layers(*map(len, _layers(dims, t))) for t in TOWERS}
        self.proj = nn.ModuleDict({
            t: nn.ModuleList(nn.Linear(_layers(dims, t)[0][m], _layers(dims, t)[1][n])
                             for m, n in enumerate(self.layer_map[t])) for t in TOWERS})

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        total = 0.0
        for tower in TOWERS:
            h_s, h_t = student.hidden_states[tower], teacher.hidden_states[tower]
            if len(h_s) != len(self.layer_map[tower]):
                raise ValueError(f"dlip: {len(h_s)} student {tower} hidden states, Dims says "
                                 f"{len(self.layer_map[tower])} layers")
            terms = [F.mse_loss(_align_tokens(tower, proj(h_s[m].float()), h_t[n].shape[1]), h_t[n].float())
                     for m, (proj, n) in enumerate(zip(self.proj[tower], self.layer_map[tower]))]
            total = total + torch.stack(terms).mean()
        return total


@register_loss
class DLIPAttn(DistillLoss):
    """L = sum_towers mean_m KL(A_t^{map(m)} ‖ A_s^m), A: (B, H, N, N) softmax attention maps (`attention_kl`).

    The layer map comes from the lengths of the attention lists. Weight 1 (as `dlip`). Only open_clip transformer
    towers expose attention maps; a student or teacher of another family is refused before training
    (`common.families`). Sigmoid teacher or student: attention maps only, scales and biases play no part.
    """
    name = "dlip_attn"
    default_weight = 1.0
    student_needs = frozenset({"attentions"})
    teacher_needs = frozenset({"attentions"})

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:
        total = 0.0
        for tower in TOWERS:
            a_s, a_t = student.attentions[tower], teacher.attentions[tower]
            terms = [attention_kl(_align_attention(tower, a_s[m].float(), a_t[n].shape[-1]), a_t[n].float())
                     for m, n in enumerate(map_layers(len(a_s), len(a_t)))]
            total = total + torch.stack(terms).mean()
        return total
