"""The optimiser and the learning-rate schedule, with open_clip_train's defaults and schedules.

AdamW's betas and epsilon default per image tower as open_clip_train's `get_default_params` (after CLIP's paper):
β 0.9/0.98, ε 1e-6 for vision transformers, β 0.9/0.999, ε 1e-8 for the others (ResNets, ConvNeXts, hybrids).
open_clip_train tells them apart by 'vit' in the model's name; here the built tower decides (one that drops tokens
is a vision transformer: open_clip's VisionTransformer, timm ViTs), so a ViT config of any name gets the ViT values.
The schedules are open_clip_train's `cosine_lr`, `const_lr` and `const_lr_cooldown`, as factors of --lr per step.
"""
from __future__ import annotations

import logging
import math

import torch

from common.families import TOKEN_DROPOUT, TowerInfo

log = logging.getLogger("kd-train")
VIT_ADAMW = (0.9, 0.98, 1e-6)  # beta1, beta2, eps
OTHER_ADAMW = (0.9, 0.999, 1e-8)
MAX_WARMUP_FRACTION = 0.1  # a longer warm-up would spend the run at a near-zero learning rate


def adamw_settings(image: TowerInfo, beta1: float | None, beta2: float | None,
                   eps: float | None) -> tuple[float, float, float]:
    """(beta1, beta2, eps): those given, the others open_clip_train's defaults for the student's image tower."""
    defaults = VIT_ADAMW if image.masking == TOKEN_DROPOUT else OTHER_ADAMW
    return tuple(default if given is None else given for given, default in zip((beta1, beta2, eps), defaults))


def param_groups(modules: list[torch.nn.Module], wd: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scales (1-D params) and logit scales. Frozen
    parameters (a locked tower) are left out, so the optimizer keeps no state for them."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def capped_warmup(warmup: int, total_steps: int) -> int:
    cap = max(1, int(MAX_WARMUP_FRACTION * total_steps))
    if warmup > cap:
        log.warning("--warmup %d is more than %d%% of the %d steps: warming up for %d steps instead", warmup,
                    round(100 * MAX_WARMUP_FRACTION), total_steps, cap)
    return min(warmup, cap)


def cooldown_steps(epochs_cooldown: int | None, steps_cooldown: int | None, steps_per_epoch: int, total: int,
                   warmup: int) -> int:
    """const-cooldown's length in steps (--epochs-cooldown counts epochs of this run's steps, as open_clip_train);
    0 without one. A cooldown must fit after the warm-up."""
    if epochs_cooldown is None and steps_cooldown is None:
        return 0
    steps = steps_cooldown if steps_cooldown is not None else epochs_cooldown * steps_per_epoch
    if steps > total - warmup:
        given = (f"--steps-cooldown {steps_cooldown}" if steps_cooldown is not None
                 else f"--epochs-cooldown {epochs_cooldown} ({steps} steps of {steps_per_epoch} an epoch)")
        raise ValueError(f"{given} is longer than the {total - warmup} steps after the warm-up ({warmup}) of this "
                         f"{total}-step run: give a shorter cooldown")
    return steps


def lr_schedule(name: str, warmup: int, total: int, cooldown: int = 0, power: float = 1.0, end: float = 0.0):
    """The factor of --lr at each step (for LambdaLR): a linear warm-up, then open_clip_train's `name` schedule:
    cosine decay to 0 at `total`, constant, or constant and then, over the last `cooldown` steps, a polynomial
    decay of power `power` to `end` (--lr-cooldown-end as a fraction of --lr)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        start = total - cooldown
        if name == "const" or step < start:
            return 1.0
        decay = (1 - min(1.0, (step - start) / cooldown)) ** power
        return decay * (1 - end) + end
    return factor
