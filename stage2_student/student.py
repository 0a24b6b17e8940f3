"""The student: an open_clip model plus the projections P_v, P_t into each teacher's embedding space."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from common.captioner import is_captioner
from common.models import LoadedCLIP
from stage2_student.features import forward_features
from stage2_student.losses import Dims, LossSet, StudentOutputs

MAX_LOGIT_SCALE = 100.0
# StudentOutputs fields that come from the model's own forward (the rest are projections of them)
_FEATURE_OF = {"image_emb": "image_emb", "text_emb": "text_emb", "image_emb_proj": "image_emb",
               "text_emb_proj": "text_emb", "masked_image_emb_proj": "masked_image_emb",
               "image_tokens": "image_tokens", "hidden_states": "hidden_states", "attentions": "attentions",
               "caption_logits": "caption_logits", "caption_labels": "caption_logits"}


def loss_dims(student: LoadedCLIP, teacher_config: dict | None) -> Dims:
    """Sizes of student and teacher the losses build their learnable parts from."""
    s, t = student.config, teacher_config or student.config
    return Dims(
        student_embed=s["embed_dim"], teacher_embed=t["embed_dim"],
        student_vision_width=s["vision_cfg"]["width"], teacher_vision_width=t["vision_cfg"]["width"],
        student_text_width=s["text_cfg"]["width"], teacher_text_width=t["text_cfg"]["width"],
        student_vision_layers=s["vision_cfg"]["layers"], teacher_vision_layers=t["vision_cfg"]["layers"],
        student_text_layers=s["text_cfg"]["layers"], teacher_text_layers=t["text_cfg"]["layers"],
    )


def check_student_fits_losses(student: LoadedCLIP, losses: LossSet) -> None:
    """Refuse, before any training work, losses that read captions from a student that writes none."""
    for name, cls in losses.classes.items():
        if cls.student_needs & {"caption_logits", "caption_labels"} and not is_captioner(student.model):
            raise ValueError(f"--losses {name}: --student {student.name} is a {type(student.model).__name__}, which "
                             f"writes no captions; give a CoCa student (a config with multimodal_cfg, e.g. "
                             f"kd-demo-coca) or drop {name!r} from --losses")


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
        self.projections = nn.ModuleDict({name: TeacherProjection(clip.embed_dim, dim)
                                          for name, dim in teacher_embeds.items()})

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(MAX_LOGIT_SCALE)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, needs: frozenset[str],
                mask_ratio: float = 0.75) -> StudentOutputs:
        """The model's own outputs; `project` adds the projections into a teacher's space (after the gather
        across ranks: a projection is per sample, so projecting the gathered batch gives the same values)."""
        wanted = frozenset(_FEATURE_OF[n] for n in needs if n in _FEATURE_OF) | {"image_emb", "text_emb"}
        feats = forward_features(self.clip, images, tokens, wanted, mask_ratio)
        return StudentOutputs(
            image_emb=feats["image_emb"],
            text_emb=feats["text_emb"],
            logit_scale=self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
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
