"""The student as kd-train trains it, through open_clip's own API: its preprocessing (`--image-mean`, `--image-std`,
`--image-interpolation`, `--image-resize-mode`) and training-only patch dropout (`--force-patch-dropout`), as
open_clip_train passes them to `create_model`, and its locked towers (`--lock-image`, `--lock-text`, LiT-style).
The cached teacher targets are untouched: each model renders its views with its own preprocessing."""
from __future__ import annotations

from common.families import TOKEN_DROPOUT
from common.models import LoadedCLIP, create_clip


def create_student(opts, device: str) -> LoadedCLIP:
    """The student with --init's weights, its preprocessing and patch dropout overridden, its towers locked."""
    preprocess = {key: value for key, value in (("mean", opts.image_mean), ("std", opts.image_std),
                                                ("interpolation", opts.image_interpolation),
                                                ("resize_mode", opts.image_resize_mode)) if value is not None}
    overrides = {"force_patch_dropout": opts.force_patch_dropout, "force_preprocess_cfg": preprocess or None}
    try:
        student = create_clip(opts.student, opts.init, device=device,
                              **{k: v for k, v in overrides.items() if v is not None})
    except TypeError as e:  # a timm tower without patch dropout refuses open_clip's patch_drop_rate
        if opts.force_patch_dropout is None:
            raise
        raise ValueError(f"--force-patch-dropout {opts.force_patch_dropout}: the student {opts.student}'s image "
                         f"tower has no patch dropout ({e}): drop the option") from e
    check_patch_dropout(student, opts.force_patch_dropout)
    lock_towers(student, opts)
    return student


def lock_towers(student: LoadedCLIP, opts) -> None:
    """open_clip's `lock_image_tower` / `lock_text_tower`: the locked parameters stop requiring gradients (the
    optimizer then holds no state for them and they stay bit-identical). A tower open_clip cannot lock so is
    refused naming it, with what would work."""
    model = student.model
    if opts.lock_image:
        groups = opts.lock_image_unlocked_groups
        _lock(student, "image", "--lock-image-unlocked-groups 0 locks it whole" if groups else "drop --lock-image",
              lambda: model.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=opts.lock_image_freeze_bn_stats))
    if opts.lock_text:
        layers, freeze_norm = opts.lock_text_unlocked_layers, opts.lock_text_freeze_layer_norm
        advice = ("add --lock-text-freeze-layer-norm (its LayerNorms lock with their layers)" if not freeze_norm
                  else "--lock-text-unlocked-layers 0 locks it whole" if layers else "drop --lock-text")
        _lock(student, "text", advice, lambda: model.lock_text_tower(unlocked_layers=layers,
                                                                     freeze_layer_norm=freeze_norm))


def _lock(student: LoadedCLIP, tower: str, advice: str, lock) -> None:
    kind = getattr(student.info, tower).kind
    try:
        lock()
    # open_clip asserts (ModifiedResNet's partial lock, its text towers' LayerNorms) or fails inside timm
    except (AssertionError, AttributeError, NotImplementedError, RuntimeError, TypeError) as e:
        raise ValueError(f"--lock-{tower}: open_clip cannot lock the {tower} tower of {student.name} ({kind}): "
                         f"{str(e).rstrip('.') or type(e).__name__}; {advice}") from e


def check_patch_dropout(student: LoadedCLIP, force_patch_dropout: float | None) -> None:
    """--force-patch-dropout needs a tower that drops patch tokens (open_clip ignores it for the others)."""
    if force_patch_dropout is not None and student.info.image.masking != TOKEN_DROPOUT:
        raise ValueError(f"--force-patch-dropout {force_patch_dropout}: the student {student.name}'s image tower "
                         f"({student.info.image.kind}) has no patch tokens to drop (only vision transformers do): "
                         f"drop the option")
