"""Distillation losses, one registered module each; importing this package fills `LOSSES`."""
from . import caption, cka, clip_kd, dlip, tokenfd  # noqa: F401  (register the losses)
from .base import (CACHEABLE_TARGETS, LOSSES, Dims, DistillLoss, LossSet, LossSpecError, StudentOutputs,
                   TeacherTargets, loss_classes, parse_loss_spec, register_loss, teacher_needs_of)

__all__ = ["CACHEABLE_TARGETS", "LOSSES", "Dims", "DistillLoss", "LossSet", "LossSpecError", "StudentOutputs",
           "TeacherTargets", "loss_classes", "parse_loss_spec", "register_loss", "teacher_needs_of"]
