"""The contract between the training loop, the target provider and the losses.

A loss is a small `torch.nn.Module` registered by name. It declares which student outputs and which teacher
targets it reads (`student_needs`, `teacher_needs`: field names of `StudentOutputs` / `TeacherTargets`), so the
loop computes only what the chosen losses read, and the target provider knows whether the cache can serve them.
The loop never looks at loss names.

Several teachers (an ensemble from one store): each loss class says what it does with them (`ensemble`):
- "per_teacher" (default): one instance per teacher, with its own learnable parts, on the student projected into
  that teacher's space (`Student.project`); the terms are averaged, L = (1/K) sum_k L(student_k, teacher_k).
  Teachers' spaces differ in width and basis, so their embeddings cannot be averaged into one target.
- "joint": one instance reads all teachers' targets (`forward_teachers`), e.g. CRD's mean similarity distribution.
Losses that read no teacher target run once.

Sigmoid-loss (SigLIP) models: a teacher's bias b_t comes with its targets (`TeacherTargets.logit_bias`, stored in
the cache), a student's learnable bias with its outputs (`StudentOutputs.logit_bias`). Each loss's docstring says
what it does with either; one that cannot serve a sigmoid teacher sets `sigmoid_teacher = False` and is refused.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from common.cache import MAIN_TEACHER
from common.dist import rank_world

from ._ops import LogitScale

# Student outputs that are pooled per sample (gathered across ranks, cached across micro-batches under --accum-freq)
POOLED_STUDENT_NEEDS = frozenset({"image_emb", "text_emb", "logit_scale", "logit_bias", "image_emb_proj",
                                  "text_emb_proj", "masked_image_emb", "masked_image_emb_proj"})
# Teacher targets the cache can hold; anything else comes from the live teacher.
CACHEABLE_TARGETS = frozenset({"image_emb", "text_emb", "logit_scale", "logit_bias", "image_grad", "text_grad"})


@dataclass
class Dims:
    """Sizes the losses build their learnable parts from, measured from the built models (`common.families`)."""
    student_embed: int
    teacher_embed: int
    student_vision_width: int = 0  # width of the final image token map
    teacher_vision_width: int = 0
    student_vision_layers: tuple[int, ...] = ()  # width of each image hidden state (block or stage output)
    teacher_vision_layers: tuple[int, ...] = ()
    student_text_layers: tuple[int, ...] = ()  # width of each text hidden state
    teacher_text_layers: tuple[int, ...] = ()


@dataclass
class StudentOutputs:
    """Student outputs on the (global, gathered) batch. Optional fields are filled only when a loss needs them."""
    image_emb: torch.Tensor  # (B, D_s) raw image embeddings, before L2 norm
    text_emb: torch.Tensor  # (B, D_s) raw text embeddings
    logit_scale: torch.Tensor  # scalar s = exp(logit_scale), clamped to <= 100
    logit_bias: torch.Tensor | None = None  # scalar b of a sigmoid-loss (SigLIP) student, learnable; None: softmax
    image_emb_proj: torch.Tensor | None = None  # (B, D_t) P_v I_s, not normalised (identity map when D_s == D_t)
    text_emb_proj: torch.Tensor | None = None  # (B, D_t) P_t T_s
    masked_image_emb: torch.Tensor | None = None  # (B, D_s) raw image embedding of the MAE-masked view
    masked_image_emb_proj: torch.Tensor | None = None  # (B, D_t) P_v I_s of the MAE-masked view (MFD)
    image_tokens: torch.Tensor | None = None  # (B, N_s, W_s) all tokens, CLS first, after the final LayerNorm
    hidden_states: dict[str, list[torch.Tensor]] | None = None  # {'image'|'text': per layer (B, N, W)}
    attentions: dict[str, list[torch.Tensor]] | None = None  # {'image'|'text': per layer (B, H, N, N)}
    # a CoCa's teacher-forced next-token logits and targets on this rank's batch (not gathered: the loss is
    # per token); L = the batch's longest caption, labels -100 at padding
    caption_logits: torch.Tensor | None = None  # (B, L-1, V)
    caption_labels: torch.Tensor | None = None  # (B, L-1) token ids
    # --local-loss: the indices of this rank's rows in the gathered batch, the anchors of losses with a local form
    # (their value is then the mean over these rows against every column); None: the global form, alike on every rank
    rows: torch.Tensor | None = None


@dataclass
class TeacherTargets:
    """Teacher targets for the view the student saw. Embeddings are L2-normalised; grads at teacher scale."""
    image_emb: torch.Tensor | None = None  # (B, D_t)
    text_emb: torch.Tensor | None = None  # (B, D_t)
    logit_scale: float | None = None  # s_t, frozen
    logit_bias: float | None = None  # b_t of a sigmoid-loss (SigLIP) teacher, frozen; None: softmax CLIP teacher
    image_grad: torch.Tensor | None = None  # (B, D_t) dL/dI of the teacher's CLIP loss on this exact batch
    text_grad: torch.Tensor | None = None  # (B, D_t)
    image_tokens: torch.Tensor | None = None  # (B, N_t, W_t) after the final LayerNorm
    hidden_states: dict[str, list[torch.Tensor]] | None = None
    attentions: dict[str, list[torch.Tensor]] | None = None


class DistillLoss(nn.Module):
    """Base class: subclasses set `name`, `student_needs`, `teacher_needs`, `default_weight` and `forward`."""
    name: ClassVar[str]
    default_weight: ClassVar[float] = 1.0
    student_needs: ClassVar[frozenset[str]] = frozenset({"image_emb", "text_emb", "logit_scale"})
    teacher_needs: ClassVar[frozenset[str]] = frozenset()
    # teacher fields that the loss uses when present but can do without (GD recomputes grads from embeddings)
    teacher_optional: ClassVar[frozenset[str]] = frozenset()
    ensemble: ClassVar[str] = "per_teacher"  # or "joint": see the module docstring
    # whether the loss can learn from a sigmoid-loss (SigLIP) teacher; each docstring says what it does with one
    sigmoid_teacher: ClassVar[bool] = True
    # whether `forward` honours `StudentOutputs.rows` (--local-loss): the mean over those anchor rows, each against
    # the whole gathered batch; the others compute the global form on every rank
    local_form: ClassVar[bool] = False

    def __init__(self, dims: Dims):
        super().__init__()
        self.dims = dims

    def forward(self, student: StudentOutputs, teacher: TeacherTargets) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_teachers(self, student: StudentOutputs, teachers: list[TeacherTargets]) -> torch.Tensor:
        """A "joint" loss's value against several teachers (with one teacher it equals `forward`)."""
        raise NotImplementedError(f"loss {self.name!r} has no joint form")  # pragma: no cover

    def after_step(self) -> None:
        """Called by the loop after each optimizer step: every learnable scale (`LogitScale`) is clamped in place."""
        for module in self.modules():
            if isinstance(module, LogitScale):
                module.clamp_()


LOSSES: dict[str, type[DistillLoss]] = {}


def register_loss(cls: type[DistillLoss]) -> type[DistillLoss]:
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice")
    LOSSES[cls.name] = cls
    return cls


class LossSpecError(ValueError):
    """A --losses value that cannot be parsed or names an unknown loss."""


_WEIGHT = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_loss_spec(spec: str) -> list[tuple[str, float | None]]:
    """'fd:2000,icl:1,crd' -> [('fd', 2000.0), ('icl', 1.0), ('crd', None)] (None = the loss's default weight)."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise LossSpecError(f"--losses {spec!r}: empty entry; write name[:weight] separated by commas")
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in LOSSES:
            raise LossSpecError(f"--losses {spec!r}: unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
        if any(n == name for n, _ in items):
            raise LossSpecError(f"--losses {spec!r}: {name!r} given twice")
        if weight == "" and ":" in part:
            raise LossSpecError(f"--losses {spec!r}: {name!r} has ':' but no weight")
        if weight and not _WEIGHT.match(weight.strip()):
            raise LossSpecError(f"--losses {spec!r}: weight {weight!r} of {name!r} is not a non-negative number "
                                f"(e.g. 2000, 0.5, 1e8)")
        if weight and not math.isfinite(float(weight)):
            raise LossSpecError(f"--losses {spec!r}: weight {weight!r} of {name!r} is beyond a float's range "
                                f"(at most about 1.8e308)")
        items.append((name, float(weight) if weight else None))
    return items


def loss_classes(spec: str) -> dict[str, type[DistillLoss]]:
    """The loss classes a --losses value names, in its order (what they need is known before any model is built)."""
    return {name: LOSSES[name] for name, _ in parse_loss_spec(spec)}


def teacher_needs_of(classes) -> frozenset[str]:
    return frozenset().union(*(cls.teacher_needs for cls in classes))


class PerTeacher(nn.Module):
    """One instance of a loss per teacher (own projections' targets and learnable parts); the mean of their terms."""

    def __init__(self, cls: type[DistillLoss], dims: dict[str, Dims]):
        super().__init__()
        self.members = nn.ModuleDict({name: cls(d) for name, d in dims.items()})

    def forward(self, students: dict[str, StudentOutputs], teachers: dict[str, TeacherTargets]) -> dict:
        return {name: loss(students[name], teachers[name]) for name, loss in self.members.items()}


class LossSet(nn.Module):
    """The chosen losses with their weights; its parameters (projections, fusion encoders...) train with the student.

    `dims` is one `Dims` (one teacher) or {teacher name: Dims} (an ensemble); the forward takes the student's
    outputs and the teachers' targets likewise (one each, or dicts keyed by teacher name)."""

    def __init__(self, spec: str, dims: Dims | dict[str, Dims]):
        super().__init__()
        parsed = parse_loss_spec(spec)
        dims = dims if isinstance(dims, dict) else {MAIN_TEACHER: dims}
        self.teacher_names = list(dims)
        self.classes = {name: LOSSES[name] for name, _ in parsed}
        first = dims[self.teacher_names[0]]
        self.losses = nn.ModuleDict({
            name: PerTeacher(cls, dims) if cls.teacher_needs and cls.ensemble == "per_teacher" else cls(first)
            for name, cls in self.classes.items()})
        self.weights = {name: (LOSSES[name].default_weight if w is None else w) for name, w in parsed}

    @property
    def student_needs(self) -> frozenset[str]:
        return frozenset().union(*(cls.student_needs for cls in self.classes.values()))

    @property
    def teacher_needs(self) -> frozenset[str]:
        return teacher_needs_of(self.classes.values())

    @property
    def teacher_optional(self) -> frozenset[str]:
        return frozenset().union(*(cls.teacher_optional for cls in self.classes.values()))

    @property
    def per_teacher_losses(self) -> frozenset[str]:
        return frozenset(name for name, loss in self.losses.items() if isinstance(loss, PerTeacher))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_needs)

    def after_step(self) -> None:
        """Call after every `optimizer.step()`: each loss keeps its learnable parts in range (`DistillLoss.after_step`)."""
        for module in self.modules():
            if isinstance(module, DistillLoss):
                module.after_step()

    @property
    def per_micro_batch(self) -> frozenset[str]:
        """Losses that read per-sample maps (tokens, hidden states, attentions, caption logits), which are not
        gathered: under --accum-freq each micro-batch's value is accumulated (plain accumulation). The others read
        pooled features only and are computed on the whole accumulated batch (open_clip's feature caching)."""
        return frozenset(name for name, cls in self.classes.items() if cls.student_needs - POOLED_STUDENT_NEEDS)

    def forward(self, student: StudentOutputs | dict[str, StudentOutputs],
                teacher: TeacherTargets | dict[str, TeacherTargets],
                names: frozenset[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the losses `names` (default: all), and each unweighted term for the log (with several
        teachers also `name@teacher`), as detached tensors: nothing here reads a value back to the host.

        --local-loss (`StudentOutputs.rows` set): a loss with a local form is scaled by W b / B (W ranks, b of the B
        gathered rows its anchors), so that the mean over ranks of each rank's value is the global loss; DDP's mean
        of the ranks' gradients is then the global gradient. The others compute the global form.

        Runs with autocast off: the losses cast their inputs to float32, and under bf16 autocast their matmuls
        (logits, Gram matrices, projections) would otherwise still run in bf16.
        """
        students = student if isinstance(student, dict) else {MAIN_TEACHER: student}
        teachers = teacher if isinstance(teacher, dict) else {MAIN_TEACHER: teacher}
        names_ = self.teacher_names
        first = students[names_[0]]
        global_form = {name: replace(s, rows=None) for name, s in students.items()}
        local_weight = 1.0
        if first.rows is not None:
            local_weight = rank_world()[1] * first.rows.shape[0] / first.image_emb.shape[0]
        total, terms = 0.0, {}
        with torch.autocast(first.image_emb.device.type, enabled=False):
            for name, loss in self.losses.items():
                if names is not None and name not in names:
                    continue
                local = first.rows is not None and self.classes[name].local_form
                inputs = students if local else global_form
                if isinstance(loss, PerTeacher):
                    parts = loss(inputs, teachers)
                    value = torch.stack(list(parts.values())).mean()
                    if len(parts) > 1:
                        terms |= {f"{name}@{t}": (local_weight * v if local else v).detach() for t, v in parts.items()}
                elif self.classes[name].teacher_needs:
                    value = loss.forward_teachers(inputs[names_[0]], [teachers[t] for t in names_])
                else:
                    value = loss(inputs[names_[0]], TeacherTargets())
                if local:
                    value = local_weight * value
                terms[name] = value.detach()
                total = total + self.weights[name] * value
        return total, terms
