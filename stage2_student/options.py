"""kd-train's options, each declared once: a `TrainOptions` field whose metadata holds its help, its click type and
what `--resume` does with it. The click options (`click_options`) and the resume lists (`TRAJECTORY_OPTIONS`,
`RESUMABLE_CHANGES`) are generated from the fields.

This module imports neither torch, open_clip nor zarr: `kd-train --help` and option errors stay fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, fields

import click

from common.defaults import DEFAULT_LOSSES, MODES, ON_ERROR_CHOICES, PRECISION_CHOICES
from common.errors import (NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT, PROBABILITY, SEED,
                           FiniteFloatRange, check_device)
from stage2_student.reporting import parse_report_to

# what --resume does with an option
TRAJECTORY = "trajectory"  # shapes the run's numbers: compared on --resume, a change refused
RESUMABLE = "resumable"  # may change on --resume; options.json's "changes" records it from the step it applied
RUN = "run"  # says what this command does with the run folder (--out, --resume, --overwrite): neither
POLICIES = (TRAJECTORY, RESUMABLE, RUN)
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")  # open_clip_train's --lr-scheduler
# the student's eval transform renders its training views, where open_clip ignores its 'random' interpolation
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")


def check_losses(ctx, param, value: str) -> str:
    """click callback for --losses: a spec that does not parse is refused with the other options."""
    # the loss registry needs torch: imported here, so that --help and the other options' errors stay fast
    from stage2_student.losses import LossSpecError, parse_loss_spec

    try:
        parse_loss_spec(value)
    except LossSpecError as e:
        raise click.BadParameter(str(e)) from e
    return value


def resume_value(ctx, param, value: str | None) -> bool | str:
    """click callback for --resume: the flag alone continues the run (True), `--resume auto` continues it or starts."""
    return {None: False, "continue": True, "auto": "auto"}[value]


def option(policy: str, default=MISSING, help: str | None = None, *, type=None, choices: tuple[str, ...] = (),
           flag: bool = False, callback=None, nargs: int | None = None, metavar: str | None = None,
           flag_value: str | None = None):
    """A TrainOptions field: its default, and in its metadata its resume policy and its click option's make-up.
    No default: the option is required. `flag_value`: an option whose value may be left out (then it is this;
    absent, click gives the callback None)."""
    metadata = {"policy": policy, "help": help, "type": type, "choices": choices, "flag": flag,
                "callback": callback, "nargs": nargs, "metavar": metavar, "flag_value": flag_value}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class TrainOptions:
    data: str = option(TRAJECTORY, help="training shards (brace pattern, directory or '::' list)")
    out: str = option(RUN, help="run folder: an open_clip hub folder (load it as local-dir:OUT), its model card, "
                                "resume.pt, metrics.jsonl; or an object-store URL (s3://bucket/runs/x), trained into a "
                                "local staging copy uploaded at every save")
    student: str = option(TRAJECTORY, help="open_clip model name, model config JSON, or hub model (hf-hub:ORG/REPO, "
                                           "local-dir:PATH: its weights are the start)")
    cache: str | None = option(TRAJECTORY, None, "teacher cache built by `kd-cache build`", type=click.Path())
    losses: str = option(TRAJECTORY, DEFAULT_LOSSES, "name[:weight],... e.g. fd:2000,icl:1,crd:1; 'task' alone trains "
                                                     "plain CLIP", callback=check_losses)
    teacher_targets: str = option(TRAJECTORY, "auto", "auto: cache, else live teacher; cache: refuse what the cache "
                                                      "cannot serve; live: always teacher", choices=MODES)
    teacher: str | None = option(TRAJECTORY, None, "live teacher when no --cache (with --teacher-targets live)")
    # a moved checkpoint: the live teachers' fingerprints are compared on --resume instead
    teacher_pretrained: str | None = option(RESUMABLE, None, "live teachers' weights, if moved since the cache was "
                                                             "built: PATH, or NAME=PATH,NAME=PATH")
    teachers: str | None = option(TRAJECTORY, None, "the cache's teachers to learn from: NAME,NAME (see `kd-cache "
                                                    "info`) or 'all' [default: main, the build's teacher]")
    synthetic_captions: float = option(TRAJECTORY, 0.0, "probability that a sample shows one of the cache's "
                                                        "synthetic captions (seeded per sample and epoch) instead of "
                                                        "its own", type=PROBABILITY)
    batch_size: int = option(TRAJECTORY, 256, "global batch (a multiple of the torchrun world size)",
                             type=click.IntRange(min=2))
    epochs: int = option(TRAJECTORY, 1, type=POSITIVE)
    steps: int | None = option(TRAJECTORY, None, "train this many steps instead of --epochs", type=POSITIVE)
    lr: float = option(TRAJECTORY, 1e-3, type=POSITIVE_FLOAT)
    beta1: float | None = option(TRAJECTORY, None, "AdamW beta1 [default: 0.9]",
                                 type=FiniteFloatRange(0, 1, max_open=True))
    beta2: float | None = option(TRAJECTORY, None, "AdamW beta2 [default: 0.98 for a vision transformer student, "
                                                   "0.999 for other image towers (ResNets, ConvNeXts, hybrids), as "
                                                   "open_clip_train]", type=FiniteFloatRange(0, 1, max_open=True))
    eps: float | None = option(TRAJECTORY, None, "AdamW epsilon [default: 1e-6 for a vision transformer student, 1e-8 "
                                                 "for other image towers]", type=POSITIVE_FLOAT)
    wd: float = option(TRAJECTORY, 0.1, type=NON_NEGATIVE_FLOAT)
    warmup: int = option(TRAJECTORY, 10000, "linear warm-up steps, then --lr-scheduler (capped at 10% of the run's "
                                            "steps)", type=NON_NEGATIVE)
    lr_scheduler: str = option(TRAJECTORY, "cosine", "after the warm-up: cosine decay to 0, const(ant), or "
                                                     "const-cooldown: constant, then a cooldown over the last "
                                                     "--epochs-cooldown epochs or --steps-cooldown steps",
                               choices=LR_SCHEDULERS)
    epochs_cooldown: int | None = option(TRAJECTORY, None, "const-cooldown: cool down over the last N epochs",
                                         type=POSITIVE)
    steps_cooldown: int | None = option(TRAJECTORY, None, "const-cooldown: cool down over the last N steps (for "
                                                          "runs counted in --steps)", type=POSITIVE)
    lr_cooldown_power: float = option(TRAJECTORY, 1.0, "const-cooldown: power of the polynomial decay (1: linear)",
                                      type=POSITIVE_FLOAT)
    lr_cooldown_end: float = option(TRAJECTORY, 0.0, "const-cooldown: the learning rate at the end",
                                    type=NON_NEGATIVE_FLOAT)
    grad_clip: float | None = option(TRAJECTORY, None, "clip the gradient norm to this value", type=POSITIVE_FLOAT)
    lock_image: bool = option(TRAJECTORY, False, "lock (freeze) the student's image tower, LiT-style: open_clip's "
                                                 "lock_image_tower", flag=True)
    lock_image_unlocked_groups: int = option(TRAJECTORY, 0, "with --lock-image: leave the last N layer groups "
                                                            "trainable", type=NON_NEGATIVE)
    lock_image_freeze_bn_stats: bool = option(TRAJECTORY, False, "with --lock-image: also freeze the BatchNorm running "
                                                                 "statistics of the locked layers", flag=True)
    lock_text: bool = option(TRAJECTORY, False, "lock (freeze) the student's text tower, e.g. one from --init: "
                                                "open_clip's lock_text_tower", flag=True)
    lock_text_unlocked_layers: int = option(TRAJECTORY, 0, "with --lock-text: leave the last N layer groups trainable",
                                            type=NON_NEGATIVE)
    lock_text_freeze_layer_norm: bool = option(TRAJECTORY, False, "with --lock-text: freeze the LayerNorms of the "
                                                                  "locked layers too (open_clip's own text towers "
                                                                  "require it)", flag=True)
    force_patch_dropout: float | None = option(TRAJECTORY, None, "override the student's patch dropout while it "
                                                                 "trains (vision transformers; its saved config "
                                                                 "keeps its own)",
                                               type=FiniteFloatRange(0, 1, max_open=True))
    image_mean: tuple[float, float, float] | None = option(TRAJECTORY, None, "the student's normalisation mean "
                                                                             "[default: its model's]",
                                                           type=PROBABILITY, nargs=3, metavar="R G B")
    image_std: tuple[float, float, float] | None = option(TRAJECTORY, None, "the student's normalisation std "
                                                                            "[default: its model's]",
                                                          type=POSITIVE_FLOAT, nargs=3, metavar="R G B")
    image_interpolation: str | None = option(TRAJECTORY, None, "the student's resize interpolation [default: its "
                                                               "model's]", choices=INTERPOLATIONS)
    image_resize_mode: str | None = option(TRAJECTORY, None, "how the student's images are resized to its input "
                                                             "[default: its model's]", choices=RESIZE_MODES)
    augment: bool = option(TRAJECTORY, False, "random crops: the cache's stored views, else fresh crops (live)",
                           flag=True)
    batching: str = option(TRAJECTORY, "shuffle", "cache: replay the build's gradient batches (GD then uses the "
                                                  "cached gradients)", choices=("shuffle", "cache"))
    # compared on --resume as resolved (auto -> bf16 or fp32 on this machine): see Trainer.resume_options
    precision: str = option(TRAJECTORY, "auto", "auto: bf16 autocast on a GPU that has it, else fp32; amp: fp16 "
                                                "autocast with a GradScaler (V100 / T4), whose skipped steps are "
                                                "counted (amp_skipped_steps), not failures", choices=PRECISION_CHOICES)
    accum_freq: int = option(TRAJECTORY, 1, "micro-batches of --batch-size per optimizer step: the step's batch is "
                                            "--batch-size x --accum-freq (open_clip's feature caching: the exact "
                                            "big-batch gradient for the pooled losses)", type=POSITIVE)
    # the same numbers to float summation order: a resumed run may switch them
    local_loss: bool = option(RESUMABLE, False, "each rank computes its own rows against the global batch "
                                                "(open_clip's --local-loss: the same gradients, 1/W of the logits' "
                                                "memory); losses without a local form keep the global one", flag=True)
    grad_checkpointing: bool = option(RESUMABLE, False, "recompute the towers' blocks in the backward instead of "
                                                        "keeping their activations (open_clip's "
                                                        "set_grad_checkpointing: less memory)", flag=True)
    torchcompile: bool = option(RESUMABLE, False, "torch.compile the student's towers", flag=True)
    device: str = option(RESUMABLE, "cpu", callback=check_device)
    workers: int = option(RESUMABLE, 2, type=NON_NEGATIVE)
    seed: int = option(TRAJECTORY, 0, type=SEED)
    shuffle_buffer: int = option(TRAJECTORY, 1000, type=POSITIVE)
    on_error: str = option(RESUMABLE, "raise", "an unreadable sample stops the run (raise), or leaves its batch and "
                                               "is counted (skip)", choices=ON_ERROR_CHOICES)
    log_every: int = option(RESUMABLE, 10, type=POSITIVE)
    save_every: int = option(RESUMABLE, 500, "save every N steps (also at each epoch's end, and on SIGINT/SIGTERM)",
                             type=POSITIVE)
    val_data: str | None = option(RESUMABLE, None, "retrieval split evaluated on rank 0 at every save: R@1/5/10 both "
                                                   "ways and the CLIP loss, logged as val/... (shards, or a "
                                                   "CLIP_benchmark root)")
    val_every: int | None = option(RESUMABLE, None, "also evaluate every N steps (the curve; only saved steps go on "
                                                    "the model card)", type=POSITIVE)
    zeroshot_data: str | None = option(RESUMABLE, None, "zero-shot split evaluated with --val-data's schedule: "
                                                        "top-1/top-5 (a directory with classnames.txt, or a "
                                                        "CLIP_benchmark root)")
    keep: int = option(RESUMABLE, 0, "keep the N newest saves as step folders checkpoints/step_NNNNNN/ (each loads "
                                     "as local-dir:)", type=NON_NEGATIVE)
    keep_best: str | None = option(RESUMABLE, None, "also keep the step folder with the best value of a val/ metric, "
                                                    "e.g. val/image_to_text_R@1 (lowest for a loss)", metavar="METRIC")
    # True: continue the run in --out; "auto": continue it if there is one, else start
    resume: bool | str = option(RUN, False, "continue the run in --out from its resume.pt; --resume auto: continue "
                                            "it if --out holds one, else start (for requeued jobs)",
                                type=click.Choice(["continue", "auto"]), callback=resume_value, metavar="[auto]",
                                flag_value="continue")
    overwrite: bool = option(RUN, False, "replace the run in --out (a non-empty --out is refused otherwise)", flag=True)
    init: str | None = option(TRAJECTORY, None, "student initial weights: open_clip checkpoint, pretrained tag, or hub "
                                                "model of the same architecture")
    target_memory_gb: float | None = option(RESUMABLE, None, "memory for cached targets per node, shared by its "
                                                             "ranks: larger targets are read chunk-aware instead of "
                                                             "held whole (default: half the RAM)", type=POSITIVE_FLOAT)
    report_to: str | None = option(RESUMABLE, None, "also log the metrics to tensorboard (event files in "
                                                    "--out/tensorboard) and/or wandb: tensorboard,wandb (each an "
                                                    "extra: pip install 'clip-kd-cache[tensorboard,wandb]')")
    wandb_project_name: str = option(RESUMABLE, "clip-kd", "the W&B project")
    name: str | None = option(RESUMABLE, None, "the W&B run's name [default: the --out folder's name]")

    def check(self) -> None:
        """What click checks for the CLI, for a TrainOptions made in Python too, and what no single option shows."""
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{flag(f.name)} {value!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2: contrastive losses need negatives")
        if self.accum_freq < 1:
            raise ValueError(f"--accum-freq {self.accum_freq}: give a whole number >= 1")
        if self.resume not in (False, True, "auto"):
            raise ValueError(f"--resume {self.resume!r}: give --resume (continue the run in --out) or --resume auto")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one of them")
        if (self.val_every or self.keep_best) and not (self.val_data or self.zeroshot_data):
            raise ValueError(f"{'--val-every' if self.val_every else '--keep-best'} needs a validation split: give "
                             f"--val-data SPEC and/or --zeroshot-data DIR")
        for name, needs in (("lock_image_unlocked_groups", "lock_image"),
                                   ("lock_image_freeze_bn_stats", "lock_image"),
                                   ("lock_text_unlocked_layers", "lock_text"),
                                   ("lock_text_freeze_layer_norm", "lock_text")):
            if getattr(self, name) and not getattr(self, needs):
                raise ValueError(f"{flag(name)} applies to a locked tower: add {flag(needs)}")
        cooldowns = [name for name in ("epochs_cooldown", "steps_cooldown") if getattr(self, name) is not None]
        if self.lr_scheduler == "const-cooldown" and len(cooldowns) != 1:
            raise ValueError("--lr-scheduler const-cooldown: give the cooldown's length as --epochs-cooldown N or "
                             "--steps-cooldown N (one of them)")
        if self.lr_scheduler != "const-cooldown" and cooldowns:
            raise ValueError(f"{flag(cooldowns[0])} is the cooldown of --lr-scheduler const-cooldown, not of "
                             f"{self.lr_scheduler}: add --lr-scheduler const-cooldown")
        parse_report_to(self.report_to)


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


# options compared on --resume (with the world size and the live teachers' weights: Trainer.resume_options)
TRAJECTORY_OPTIONS = tuple(f.name for f in fields(TrainOptions) if f.metadata["policy"] == TRAJECTORY)
# options a --resume may change: they do not change the numbers (options.json records from which step they applied)
RESUMABLE_CHANGES = tuple(f.name for f in fields(TrainOptions) if f.metadata["policy"] == RESUMABLE)


def click_kwargs(f: dataclasses.Field) -> dict:
    """click.option's arguments for a TrainOptions field."""
    meta = f.metadata
    kwargs = {k: meta[k] for k in ("help", "callback", "nargs", "metavar") if meta[k] is not None}
    if f.default is MISSING:
        kwargs["required"] = True
    elif meta["flag_value"] is not None:
        kwargs.update(default=None, is_flag=False, flag_value=meta["flag_value"])
    else:
        kwargs["default"] = f.default
        kwargs["show_default"] = f.default is not None and not meta["flag"]
    if meta["flag"]:
        kwargs["is_flag"] = True
    elif meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif meta["type"] is not None:
        kwargs["type"] = meta["type"]
    return kwargs


def click_options(command):
    """Decorate a click command with one option per TrainOptions field, in field order (as --help lists them)."""
    for f in reversed(fields(TrainOptions)):
        command = click.option(flag(f.name), **click_kwargs(f))(command)
    return command
