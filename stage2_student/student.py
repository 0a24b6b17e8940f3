"""The student: an open_clip model plus the projections P_v, P_t into each teacher's embedding space."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from common.families import check_serves, forward_features
from common.models import LoadedCLIP
from stage2_student.losses import Dims, LossSet, StudentOutputs

MAX_LOGIT_SCALE = 100.0
# StudentOutputs fields that come from the model's own forward (the rest are projections of them)
_FEATURE_OF = {"image_emb": "image_emb", "text_emb": "text_emb", "image_emb_proj": "image_emb",
               "text_emb_proj": "text_emb", "masked_image_emb_proj": "masked_image_emb",
               "image_tokens": "image_tokens", "hidden_states": "hidden_states", "attentions": "attentions",
               "caption_logits": "caption_logits", "caption_labels": "caption_logits"}


def loss_dims(student: LoadedCLIP, teacher: LoadedCLIP | None, teacher_embed: int | None) -> Dims:
    """Sizes of student and teacher the losses build their learnable parts from, measured from the built models
    (`common.families.describe`). Without a live teacher only its embedding width is known (from the cache), which
    is all that losses on cached targets read."""
    s = student.info
    t = teacher.info if teacher is not None else None
    return Dims(
        student_embed=student.embed_dim, teacher_embed=teacher_embed or student.embed_dim,
        student_vision_width=s.image.token_width, teacher_vision_width=t.image.token_width if t else 0,
        student_vision_layers=s.image.layer_widths, teacher_vision_layers=t.image.layer_widths if t else (),
        student_text_layers=s.text.layer_widths, teacher_text_layers=t.text.layer_widths if t else (),
    )


def check_models_serve_losses(losses: LossSet, student: LoadedCLIP, teachers: dict[str, LoadedCLIP],
                              sigmoid_teachers: dict[str, bool]) -> None:
    """Refuse, before any training work, a loss that needs what the student or a live teacher cannot give
    (attention maps of a CNN, captions of a non-CoCa, ...), or that cannot learn from a sigmoid teacher."""
    for name, cls in losses.classes.items():
        check_serves(student.info, _features(cls.student_needs), student.name, "student", name)
        for teacher in teachers.values():
            check_serves(teacher.info, _features(cls.teacher_needs), teacher.name, "teacher", name)
        for teacher, sigmoid in sigmoid_teachers.items():
            if sigmoid and cls.teacher_needs and not cls.sigmoid_teacher:
                raise ValueError(f"--losses {name}: teacher {teacher} was trained with the sigmoid (SigLIP) loss, "
                                 f"which {name!r} cannot distil (see its docstring); drop it from --losses")


def _features(needs: frozenset[str]) -> frozenset[str]:
    return frozenset(_FEATURE_OF[n] for n in needs if n in _FEATURE_OF)


class TeacherProjection(nn.Module):
    """P_v, P_t into one teacher's space: Linear D_s -> D_t with bias when widths differ, identity otherwise."""

    def __init__(self, dim: int, teacher_embed: int | None):
        super().__init__()
        needs_proj = teacher_embed is not None and teacher_embed != dim
        self.image = nn.Linear(dim, teacher_embed) if needs_proj else nn.Identity()
        self.text = nn.Linear(dim, teacher_embed) if needs_proj else nn.Identity()


class Student(nn.Module):
    """open_clip model + one `TeacherProjection` per teacher (keyed by the teacher's name in the store)."""

    def __init__(self, clip: LoadedCLIP, teacher_embeds: dict[str, int | None]):
        super().__init__()
        self.clip = clip.model
        self.info = clip.info
        self.projections = nn.ModuleDict({name: TeacherProjection(clip.embed_dim, dim)
                                          for name, dim in teacher_embeds.items()})

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, needs: frozenset[str],
                mask_ratio: float = 0.75) -> StudentOutputs:
        """The model's own outputs; `project` adds the projections into a teacher's space (after the gather
        across ranks: a projection is per sample, so projecting the gathered batch gives the same values)."""
        wanted = frozenset(_FEATURE_OF[n] for n in needs if n in _FEATURE_OF) | {"image_emb", "text_emb"}
        feats = forward_features(self.clip, images, tokens, wanted, mask_ratio, self.info)
        return StudentOutputs(
            image_emb=feats["image_emb"],
            text_emb=feats["text_emb"],
            logit_scale=self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
            logit_bias=getattr(self.clip, "logit_bias", None),
            masked_image_emb=feats.get("masked_image_emb"),
            image_tokens=feats.get("image_tokens"),
            hidden_states=feats.get("hidden_states"),
            attentions=feats.get("attentions"),
            caption_logits=feats.get("caption_logits"),
            caption_labels=feats.get("caption_labels"),
        )

    def project(self, outputs: StudentOutputs, teacher: str) -> StudentOutputs:
        projection = self.projections[teacher]
        masked = outputs.masked_image_emb
        return replace(outputs, image_emb_proj=projection.image(outputs.image_emb),
                       text_emb_proj=projection.text(outputs.text_emb),
                       masked_image_emb_proj=projection.image(masked) if masked is not None else None)
